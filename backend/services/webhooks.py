"""Signed webhook deliveries in the Standard Webhooks format, retried with backoff, and the
check a receiver runs.

Each delivery carries the three Standard Webhooks headers (https://www.standardwebhooks.com),
so receivers can verify it with any of that spec's libraries:
- `webhook-id`: the delivery id, the same on every retry (receivers de-duplicate by it);
- `webhook-timestamp`: Unix seconds when this attempt was signed;
- `webhook-signature`: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, keyed with the
  bytes WEBHOOK_SECRET (`whsec_<base64>`) encodes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from config import webhook_signing_key
from echo import shown
from services.backoff import backoff_delay, parse_retry_after
from version import __version__

logger = logging.getLogger(__name__)

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def signature(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of one attempt: `v1,<base64 HMAC-SHA256>`."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """What a receiver runs: one of the `v1` signatures matches and the timestamp is recent."""
    lowered = {name.lower(): value for name, value in headers.items()}
    delivery_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    if not delivery_id or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_seconds:
        return False
    expected = signature(webhook_signing_key(secret), delivery_id, int(timestamp), body).encode()
    # The header may list several space-separated signatures (a secret being rotated).
    offered = lowered.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in offered)


class WebhookRefusedError(Exception):
    """The webhook URL may not be called: not https, or a non-public address, while those
    are not allowed."""


class WebhookUnresolvableError(WebhookRefusedError):
    """The webhook's host does not resolve (now: at delivery this is retried)."""


async def check_destination(
    url: str, *, allow_private_networks: bool, allow_http: bool = False
) -> None:
    """Refuse plain-http URLs and hosts that resolve to loopback, private or link-local
    addresses, unless the settings allow them; WebhookUnresolvableError for an unknown host.

    Webhook URLs come from clients; without this check they could make the server call its
    own network (cloud metadata endpoints, internal services), or send signed payloads in
    the clear.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" and not allow_http:
        raise WebhookRefusedError("must be an https:// URL (WEBHOOK_ALLOW_HTTP=true allows http)")
    if allow_private_networks:
        return
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        addresses = await loop.getaddrinfo(host, port)
    except OSError:
        raise WebhookUnresolvableError(f"the host {shown(host)} does not resolve") from None
    for *_, sockaddr in addresses:
        if not ipaddress.ip_address(sockaddr[0]).is_global:
            raise WebhookRefusedError(
                f"the host {shown(host)} resolves to a non-public address "
                "(WEBHOOK_ALLOW_PRIVATE_NETWORKS=true allows it)"
            )


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """How a delivery ended: delivered, failed (attempts ran out) or refused."""

    status: Literal["delivered", "failed", "refused"]
    attempts: int
    last_error: str | None = None


class WebhookSender:
    """Delivers events in the background; each delivery is retried until it gets a 2xx."""

    def __init__(
        self,
        secret: str,
        *,
        max_attempts: int = 5,
        timeout_seconds: float = 10.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        allow_private_networks: bool = False,
        allow_http: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._key = webhook_signing_key(secret)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.allow_private_networks = allow_private_networks
        self.allow_http = allow_http
        self._on_outcome = on_outcome
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,  # a redirect must not steer a signed payload elsewhere
            headers={"User-Agent": f"mv-backend/{__version__}"},
        )
        self._tasks: set[asyncio.Task[DeliveryOutcome]] = set()

    def send(
        self,
        url: str,
        event_type: str,
        data: dict[str, Any],
        *,
        delivery_id: str | None = None,
        on_finished: Callable[[DeliveryOutcome], Awaitable[None]] | None = None,
    ) -> str:
        """Start delivering `data` as a `event_type` event; returns the delivery id.

        `on_finished` is awaited with the outcome once the delivery ends.
        """
        delivery_id = delivery_id or str(uuid.uuid4())
        body = json.dumps(
            {"id": delivery_id, "type": event_type, "data": data}, separators=(",", ":")
        ).encode()
        task = asyncio.create_task(self._deliver_and_report(url, delivery_id, body, on_finished))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery_id

    async def _deliver_and_report(
        self,
        url: str,
        delivery_id: str,
        body: bytes,
        on_finished: Callable[[DeliveryOutcome], Awaitable[None]] | None,
    ) -> DeliveryOutcome:
        outcome = await self.deliver(url, delivery_id, body)
        if on_finished is not None:
            try:
                await on_finished(outcome)
            except Exception:  # reporting must not break the sender
                logger.exception("recording the outcome of webhook %s failed", delivery_id)
        return outcome

    def headers(
        self, delivery_id: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        """The signed headers of one attempt."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {
            "Content-Type": "application/json",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self._key, delivery_id, timestamp, body),
        }

    async def check(self, url: str) -> None:
        """Refuse a destination this sender would not call (at submit, before any work)."""
        await check_destination(
            url, allow_private_networks=self.allow_private_networks, allow_http=self.allow_http
        )

    async def deliver(self, url: str, delivery_id: str, body: bytes) -> DeliveryOutcome:
        """POST until a 2xx, a final refusal, or the last attempt; how it ended.

        A host that does not resolve is retried like a 5xx (DNS may be down for a moment);
        a destination the settings do not allow is refused at once.
        """
        failure: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                await self.check(url)
                response = await self._client.post(
                    url, content=body, headers=self.headers(delivery_id, body)
                )
            except WebhookUnresolvableError as error:
                failure = str(error)
            except WebhookRefusedError as error:
                logger.warning("webhook %s not sent: %s", delivery_id, error)
                return self._ended("refused", attempt, str(error))
            except httpx.HTTPError as error:
                failure = type(error).__name__
            else:
                if 200 <= response.status_code < 300:
                    return self._ended("delivered", attempt, failure)
                failure = f"HTTP {response.status_code}"
                if response.status_code not in RETRYABLE_STATUS:
                    logger.warning("webhook %s refused by receiver: %s", delivery_id, failure)
                    return self._ended("refused", attempt, failure)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt == self.max_attempts:
                break
            delay = backoff_delay(
                attempt, base=self.backoff_base, cap=self.backoff_cap, retry_after=retry_after
            )
            logger.info("webhook %s: %s; retry in %.2f s", delivery_id, failure, delay)
            await asyncio.sleep(delay)
        logger.warning("webhook %s failed after %d attempt(s)", delivery_id, self.max_attempts)
        return self._ended("failed", self.max_attempts, failure)

    def _ended(
        self, status: Literal["delivered", "failed", "refused"], attempts: int, error: str | None
    ) -> DeliveryOutcome:
        self._on_outcome(status)
        return DeliveryOutcome(status, attempts, error)

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for deliveries in progress (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)

    async def aclose(self) -> None:
        """Stop deliveries still retrying and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

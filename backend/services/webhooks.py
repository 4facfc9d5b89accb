"""Signed webhook deliveries, retried with backoff, and the check a receiver runs.

Each delivery carries three headers:
- `Webhook-Id`: the delivery id, the same on every retry (receivers de-duplicate by it);
- `Webhook-Timestamp`: Unix seconds when this attempt was signed;
- `Webhook-Signature`: `v1=` + hex HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed with
  WEBHOOK_SECRET.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.backoff import backoff_delay, parse_retry_after
from version import __version__

logger = logging.getLogger(__name__)

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `Webhook-Signature` value of one attempt."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """What a receiver runs: the signature matches and the timestamp is recent."""
    lowered = {name.lower(): value for name, value in headers.items()}
    delivery_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    received = lowered.get("webhook-signature", "")
    if not delivery_id or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_seconds:
        return False
    expected = signature(secret, delivery_id, int(timestamp), body)
    return hmac.compare_digest(expected, received)


class WebhookRefusedError(Exception):
    """The webhook URL may not be called (a private address while those are not allowed)."""


async def check_destination(url: str, *, allow_private_networks: bool) -> None:
    """Refuse URLs whose host resolves to a loopback, private or link-local address.

    Webhook URLs come from clients; without this check they could make the server call its
    own network (cloud metadata endpoints, internal services).
    """
    if allow_private_networks:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        addresses = await loop.getaddrinfo(host, port)
    except OSError as error:
        raise WebhookRefusedError(f"cannot resolve {host!r}: {error}") from None
    for *_, sockaddr in addresses:
        if not ipaddress.ip_address(sockaddr[0]).is_global:
            raise WebhookRefusedError(f"{host!r} resolves to a non-public address")


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
        transport: httpx.AsyncBaseTransport | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._secret = secret
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.allow_private_networks = allow_private_networks
        self._on_outcome = on_outcome
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,  # a redirect must not steer a signed payload elsewhere
            headers={"User-Agent": f"mv-backend/{__version__}"},
        )
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, event_type: str, data: dict[str, Any]) -> str:
        """Start delivering `data` as a `event_type` event; returns the delivery id."""
        delivery_id = str(uuid.uuid4())
        body = json.dumps(
            {"id": delivery_id, "type": event_type, "data": data}, separators=(",", ":")
        ).encode()
        task = asyncio.create_task(self.deliver(url, delivery_id, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery_id

    def headers(
        self, delivery_id: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        """The signed headers of one attempt."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {
            "Content-Type": "application/json",
            "Webhook-Id": delivery_id,
            "Webhook-Timestamp": str(timestamp),
            "Webhook-Signature": signature(self._secret, delivery_id, timestamp, body),
        }

    async def deliver(self, url: str, delivery_id: str, body: bytes) -> bool:
        """POST until a 2xx, a final refusal, or the last attempt; True when delivered."""
        try:
            await check_destination(url, allow_private_networks=self.allow_private_networks)
        except WebhookRefusedError as error:
            logger.warning("webhook %s not sent: %s", delivery_id, error)
            self._on_outcome("refused")
            return False
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                response = await self._client.post(
                    url, content=body, headers=self.headers(delivery_id, body)
                )
            except httpx.HTTPError as error:
                failure = type(error).__name__
            else:
                if 200 <= response.status_code < 300:
                    self._on_outcome("delivered")
                    return True
                failure = f"HTTP {response.status_code}"
                if response.status_code not in RETRYABLE_STATUS:
                    logger.warning("webhook %s refused by receiver: %s", delivery_id, failure)
                    self._on_outcome("refused")
                    return False
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt == self.max_attempts:
                break
            delay = backoff_delay(
                attempt, base=self.backoff_base, cap=self.backoff_cap, retry_after=retry_after
            )
            logger.info("webhook %s: %s; retry in %.2f s", delivery_id, failure, delay)
            await asyncio.sleep(delay)
        logger.warning("webhook %s failed after %d attempt(s)", delivery_id, self.max_attempts)
        self._on_outcome("failed")
        return False

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

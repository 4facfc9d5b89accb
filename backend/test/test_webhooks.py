"""Webhook deliveries in isolation: Standard Webhooks signatures, which failures are retried,
which destinations are refused, backoff bounds."""

from __future__ import annotations

import base64

import httpx
import pytest

from config import webhook_signing_key
from services.backoff import backoff_delay
from services.webhooks import (
    DeliveryOutcome,
    WebhookRefusedError,
    WebhookSender,
    WebhookUnresolvableError,
    check_destination,
    signature,
    verify_webhook,
)

SECRET = "whsec_" + base64.b64encode(b"unit-test-webhook-secret-32bytes").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-webhook-secret-of-32byte").decode()


def sender(replies: list[int], seen: list[httpx.Request], **options: object) -> WebhookSender:
    """A sender whose receiver answers with `replies` in turn (200 once they run out)."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(replies.pop(0) if replies else 200)

    return WebhookSender(
        SECRET,
        max_attempts=3,
        backoff_base=0.001,
        allow_private_networks=True,
        transport=httpx.MockTransport(answer),
        **options,  # type: ignore[arg-type]
    )


async def test_a_refusal_is_not_retried_and_a_5xx_is_until_attempts_run_out() -> None:
    seen: list[httpx.Request] = []
    outcomes: list[str] = []
    refused = sender([400], seen, on_outcome=outcomes.append)
    refusal = await refused.deliver("https://hooks.example.com/a", "d-1", b"{}")
    assert refusal == DeliveryOutcome("refused", 1, "HTTP 400")
    assert len(seen) == 1
    seen.clear()
    failing = sender([503, 502, 500], seen, on_outcome=outcomes.append)
    failure = await failing.deliver("https://hooks.example.com/a", "d-2", b"{}")
    assert failure == DeliveryOutcome("failed", 3, "HTTP 500")
    assert len(seen) == 3
    assert {request.headers["Webhook-Id"] for request in seen} == {"d-2"}
    assert outcomes == ["refused", "failed"]
    await refused.aclose()
    await failing.aclose()


async def test_redirects_are_not_followed() -> None:
    seen: list[httpx.Request] = []
    redirected = sender([307], seen)
    outcome = await redirected.deliver("https://hooks.example.com/a", "d-3", b"{}")
    assert outcome.status == "refused"
    assert [str(request.url) for request in seen] == ["https://hooks.example.com/a"]
    await redirected.aclose()


def test_signatures_bind_id_timestamp_and_body() -> None:
    body = b'{"ok":true}'
    headers = {
        "Webhook-Id": "d-4",
        "Webhook-Timestamp": "1700000000",
        "Webhook-Signature": signature(webhook_signing_key(SECRET), "d-4", 1700000000, body),
    }
    assert headers["Webhook-Signature"].startswith("v1,")
    assert verify_webhook(SECRET, headers, body, now=1700000100)
    assert not verify_webhook(SECRET, headers, body, now=1700001000)  # too old: a replay
    assert not verify_webhook(SECRET, {**headers, "Webhook-Id": "d-5"}, body, now=1700000000)
    tampered = {**headers, "Webhook-Timestamp": "1700000001"}
    assert not verify_webhook(SECRET, tampered, body, now=1700000000)
    assert not verify_webhook(SECRET, {}, body)
    assert not verify_webhook(OTHER_SECRET, headers, body, now=1700000000)
    # Several signatures (a secret being rotated): any one that matches will do.
    rotated = {**headers, "Webhook-Signature": "v1,bm90IGl0 " + headers["Webhook-Signature"]}
    assert verify_webhook(SECRET, rotated, body, now=1700000000)


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("plain-secret-without-prefix-0123456", "must start with whsec_"),
        ("whsec_not base64!", "followed by base64"),
        ("whsec_" + base64.b64encode(b"too-short").decode(), "24 to 64 bytes"),
    ],
)
def test_secrets_must_be_standard_webhooks_secrets(secret: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        webhook_signing_key(secret)


async def test_a_host_that_does_not_resolve_is_retried_then_fails() -> None:
    seen: list[httpx.Request] = []
    outcomes: list[str] = []
    unresolvable = WebhookSender(
        SECRET,
        max_attempts=3,
        backoff_base=0.001,
        transport=httpx.MockTransport(lambda request: seen.append(request) or httpx.Response(200)),
        on_outcome=outcomes.append,
    )
    outcome = await unresolvable.deliver("https://no-such-host.invalid/hook", "d-6", b"{}")
    assert outcome.status == "failed"  # retried like a 5xx, not refused after one try
    assert outcome.attempts == 3
    assert "does not resolve" in str(outcome.last_error)
    assert outcomes == ["failed"]
    assert seen == []
    await unresolvable.aclose()


async def test_plain_http_is_refused_unless_allowed() -> None:
    with pytest.raises(WebhookRefusedError, match="https"):
        await check_destination("http://hooks.example.com/x", allow_private_networks=True)
    await check_destination(
        "http://hooks.example.com/x", allow_private_networks=True, allow_http=True
    )
    with pytest.raises(WebhookUnresolvableError, match="does not resolve"):
        await check_destination("https://no-such-host.invalid/x", allow_private_networks=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://10.1.2.3/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
    ],
)
async def test_private_destinations_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefusedError, match="non-public"):
        await check_destination(url, allow_private_networks=False, allow_http=True)
    await check_destination(url, allow_private_networks=True, allow_http=True)


@pytest.mark.parametrize("attempt", [1, 2, 5, 30, 200])
def test_backoff_stays_within_its_bounds(attempt: int) -> None:
    for _ in range(200):
        delay = backoff_delay(attempt, base=0.5, cap=20.0)
        assert 0 <= delay <= min(20.0, 0.5 * 2 ** (attempt - 1))
    assert backoff_delay(attempt, base=0.5, cap=20.0, retry_after=7) >= 7
    assert backoff_delay(attempt, base=0.5, cap=20.0, retry_after=10_000) <= 60

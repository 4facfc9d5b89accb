"""Asynchronous generation: 202 + status, progress, queue positions, cancel, webhooks,
idempotency, the shared bounded queue, and recovery of records a crash left running."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from conftest import ApiHarness, BlockingGenerator, out_of_memory_loader
from receivers import webhook_receiver
from services.generation.base import GenerationTimeoutError
from services.generation.diffusion import load_pipeline
from services.generation.records import GenerationRecord, active_prefix, generation_key
from services.webhooks import verify_webhook

JOBS = "/api/mv/character_reference_jobs"
GENERATE = "/api/mv/generate_character_reference"
BODY = {"character_description": "a silver robot", "num_images": 2, "seed": 5}
FINISHED = {"succeeded", "failed", "canceled"}


def wait_until(
    api: ApiHarness, status_url: str, accept: Callable[[dict[str, Any]], bool], timeout=30.0
) -> dict[str, Any]:
    """Poll a status URL until `accept(status)`; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = api.client.get(status_url)
        assert reply.status_code == 200, reply.text
        if accept(reply.json()):
            return reply.json()
        time.sleep(0.02)
    pytest.fail(f"{status_url} never reached the expected state: {reply.json()}")


def finished(status: dict[str, Any]) -> bool:
    """Whether a status is final."""
    return status["status"] in FINISHED


def blocking_api(
    make_api: Callable[..., ApiHarness], **overrides: Any
) -> tuple[ApiHarness, BlockingGenerator]:
    """An app whose only generator runs until released."""
    blocking = BlockingGenerator()
    overrides.setdefault("image_generator", "replicate")
    api = make_api(generators={"replicate": blocking}, **overrides)
    return api, blocking


def submit(api: ApiHarness, body: dict[str, Any] | None = None, **headers: str) -> dict[str, Any]:
    """POST an async generation; assert the 202 and return its status."""
    reply = api.client.post(JOBS, json=body or BODY, headers=headers)
    assert reply.status_code == 202, reply.text
    status = reply.json()
    assert reply.headers["Location"] == status["status_url"]
    return status


# ------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_async_generation_succeeds_with_exactly_the_sync_reply(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = make_api(mode)
    status = submit(api)
    assert status["status"] in {"queued", "running"}
    assert status["status_url"] == f"{JOBS}/{status['generation_id']}"
    done = wait_until(api, status["status_url"], finished)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 4  # SDXL-Turbo: 4 steps
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    result = done["result"]
    sync = api.client.post(GENERATE, json=BODY).json()
    assert set(result) == set(sync)
    assert set(result["metadata"]) == set(sync["metadata"])
    assert [image["seed"] for image in result["images"]] == [5, 6]
    for image, same_seed in zip(result["images"], sync["images"], strict=True):
        assert set(image) == set(same_seed)
        data = base64.b64decode(image["base64"])
        assert data == base64.b64decode(same_seed["base64"])  # same seed, same pixels
        assert api.fetch(image["url"]).content == data
    if mode == "s3":
        assert api.s3 is not None
        key = generation_key(status["generation_id"])
        for _ in range(100):  # the final record is saved just after the waiters are told
            raw = api.s3.get_object(Bucket=api.settings.storage_bucket, Key=key)["Body"].read()
            if json.loads(raw)["status"] == "succeeded":
                break
            time.sleep(0.02)
        stored = json.loads(raw)
        assert stored["status"] == "succeeded"
        assert stored["result"]["images"][0]["base64"] is None  # the images are stored apart


def test_running_generation_reports_progress_then_the_queue_position_of_others(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = blocking_api(make_api)
    first = submit(api)
    running = wait_until(
        api, first["status_url"], lambda s: s["status"] == "running" and s["progress"]["step"] > 0
    )
    assert running["progress"]["total_steps"] == BlockingGenerator.total_steps
    assert 0 < running["progress"]["fraction"] < 1
    assert running["queue_position"] is None
    second, third = submit(api), submit(api)
    assert api.client.get(second["status_url"]).json()["queue_position"] == 1
    assert api.client.get(third["status_url"]).json()["queue_position"] == 2
    blocking.release.set()
    for status in (first, second, third):
        assert wait_until(api, status["status_url"], finished)["status"] == "succeeded"


def test_a_failed_generation_says_why(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(local_loader=out_of_memory_loader)  # fails while generating, no fallback
    done = wait_until(api, submit(api)["status_url"], finished)
    assert done["status"] == "failed"
    assert done["result"] is None
    assert done["error"]["error"] == "GeneratorUnavailable"
    assert done["error"]["status_code"] == 503
    assert "ran out of memory" in done["error"]["message"]


def test_unknown_and_malformed_generation_ids(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    missing = api.client.get(f"{JOBS}/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["detail"]["error"] == "NotFound"
    assert api.client.delete(f"{JOBS}/{uuid.uuid4()}").status_code == 404
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-00000000000g", "1" * 40):
        reply = api.client.get(f"{JOBS}/{bad}")
        assert reply.status_code == 422
        assert reply.json()["detail"]["fields"][0]["loc"] == ["path", "generation_id"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("webhook_url", "ftp://example.com/hook"),
        ("webhook_url", "https://user:pw@example.com/hook"),
        ("webhook_url", "not a url"),
        ("webhook_url", "https://example.com/" + "a" * 2100),
        ("num_images", 9),
        ("unknown_field", 1),
    ],
)
def test_bad_async_bodies_are_422_naming_the_field(
    make_api: Callable[..., ApiHarness], field: str, value: object
) -> None:
    api = make_api()
    reply = api.client.post(JOBS, json={**BODY, field: value})
    assert reply.status_code == 422
    assert reply.json()["detail"]["fields"][0]["loc"][-1] == field


# ---------------------------------------------------------------------- cancel


def test_cancel_a_queued_generation_drops_it(make_api: Callable[..., ApiHarness]) -> None:
    api, blocking = blocking_api(make_api)
    first = submit(api)
    wait_until(api, first["status_url"], lambda s: s["status"] == "running")
    queued = submit(api)
    reply = api.client.delete(queued["status_url"])
    assert reply.status_code == 200
    assert reply.json()["status"] == "canceled"
    assert reply.json()["started_at"] is None
    blocking.release.set()
    assert wait_until(api, first["status_url"], finished)["status"] == "succeeded"
    assert api.client.get(queued["status_url"]).json()["status"] == "canceled"
    # Canceling again is harmless; a finished generation cannot be canceled.
    assert api.client.delete(queued["status_url"]).json()["status"] == "canceled"
    finished_reply = api.client.delete(first["status_url"])
    assert finished_reply.status_code == 409
    assert finished_reply.json()["detail"]["error"] == "AlreadyFinished"


def test_cancel_a_running_generation_stops_it_at_its_next_step(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = blocking_api(make_api)
    running = submit(api)
    wait_until(api, running["status_url"], lambda s: s["status"] == "running")
    waiting = submit(api)
    reply = api.client.delete(running["status_url"])
    assert reply.status_code == 200
    canceled = reply.json()
    assert canceled["status"] == "canceled"
    assert canceled["progress"]["step"] < BlockingGenerator.total_steps
    # The generator is free again: the next generation runs and finishes.
    started = wait_until(api, waiting["status_url"], lambda s: s["status"] == "running")
    assert started["queue_position"] is None
    blocking.release.set()
    assert wait_until(api, waiting["status_url"], finished)["status"] == "succeeded"


def slow_steps(pipeline: Any, seconds: float, steps_run: list[int]) -> Any:
    """The real pipeline, with each denoising step taking at least `seconds` (so that a test
    can act between steps on a fast CPU); every step is counted in `steps_run`.

    Its class keeps its name, so the generator still recognises the model family.
    """
    base = type(pipeline)

    class SlowSteps(base):  # type: ignore[misc, valid-type]
        def __call__(self, **arguments: Any) -> Any:
            on_step_end = arguments["callback_on_step_end"]

            def slow(pipe: Any, step: int, timestep: Any, tensors: Any) -> Any:
                steps_run.append(step)
                time.sleep(seconds)
                return on_step_end(pipe, step, timestep, tensors)

            return super().__call__(**{**arguments, "callback_on_step_end": slow})

    SlowSteps.__name__ = base.__name__
    pipeline.__class__ = SlowSteps
    return pipeline


def test_cancel_stops_the_local_pipeline_at_its_next_step(
    make_api: Callable[..., ApiHarness],
) -> None:
    steps_run: list[int] = []
    api = make_api(
        image_generator="local",
        local_loader=lambda model, device: slow_steps(load_pipeline(model, device), 0.3, steps_run),
    )
    status = submit(api, {**BODY, "num_images": 1})
    wait_until(
        api,
        status["status_url"],
        lambda s: s["status"] == "running" and s["progress"]["step"] >= 1,
    )
    canceled = api.client.delete(status["status_url"]).json()
    assert canceled["status"] == "canceled"
    assert canceled["result"] is None
    # The worker thread is free once the pipeline stops; the next request runs all 4 steps.
    after = api.client.post(GENERATE, json={**BODY, "num_images": 1})
    assert after.status_code == 200
    canceled_steps = len(steps_run) - 4
    assert steps_run[canceled_steps:] == [0, 1, 2, 3]
    assert 1 <= canceled_steps < 4, steps_run


def test_a_sync_request_whose_generation_is_canceled_gets_409(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = blocking_api(make_api)
    replies: dict[str, httpx.Response] = {}
    sync = threading.Thread(
        target=lambda: replies.setdefault("r", api.client.post(GENERATE, json=BODY))
    )
    sync.start()
    assert blocking.started.wait(10)
    queue = api.client.app.state.generation_queue
    (generation_id,) = list(queue._live)  # the sync request's generation
    assert api.client.delete(f"{JOBS}/{generation_id}").json()["status"] == "canceled"
    sync.join(10)
    assert replies["r"].status_code == 409
    assert replies["r"].json()["detail"]["error"] == "Canceled"


# -------------------------------------------------------------------- webhooks


def test_webhook_is_signed_and_retried_with_the_same_delivery_id(
    make_api: Callable[..., ApiHarness],
) -> None:
    with webhook_receiver(statuses=[503]) as receiver:
        api, blocking = blocking_api(make_api)
        blocking.release.set()
        status = submit(api, {**BODY, "webhook_url": receiver.url})
        deliveries = receiver.wait_for(2)
    assert len(deliveries) == 2, "the 503 must be retried once"
    first, second = deliveries
    secret = api.settings.webhook_secret.get_secret_value()
    another = "whsec_" + base64.b64encode(b"another-webhook-secret-of-32byte").decode()
    for delivery in deliveries:
        assert verify_webhook(secret, delivery.headers, delivery.body)
        assert not verify_webhook(another, delivery.headers, delivery.body)
        assert not verify_webhook(secret, delivery.headers, delivery.body + b" ")
        # The Standard Webhooks reference library verifies what was received over HTTP...
        headers = dict(delivery.headers)
        assert Webhook(secret).verify(delivery.body, headers)["id"] == headers["webhook-id"]
        # ...and refuses a changed body, or the right body under another secret.
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(delivery.body.replace(b"succeeded", b"failed!!!"), headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(another).verify(delivery.body, headers)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    event = json.loads(second.body)
    assert event["id"] == second.headers["webhook-id"]
    assert event["type"] == "generation.succeeded"
    assert event["data"]["generation_id"] == status["generation_id"]
    assert event["data"]["status"] == "succeeded"
    assert len(event["data"]["result"]["images"]) == 2
    assert all(image["base64"] is None for image in event["data"]["result"]["images"])
    metrics = api.client.get("/metrics").text
    assert 'mv_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    # The status reply (and the stored record) says what happened to the webhook.
    webhook = _wait_for_webhook(api, status["status_url"])
    assert webhook == {
        "status": "delivered",
        "delivery_id": first.headers["webhook-id"],
        "attempts": 2,
        "last_error": "HTTP 503",
    }
    assert "webhook" not in event["data"]  # the payload does not describe its own delivery


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([503, 503, 503], {"status": "failed", "attempts": 3, "last_error": "HTTP 503"}),
        ([410], {"status": "refused", "attempts": 1, "last_error": "HTTP 410"}),
    ],
)
def test_the_status_says_when_a_webhook_failed_or_was_refused(
    make_api: Callable[..., ApiHarness], statuses: list[int], expected: dict[str, Any]
) -> None:
    with webhook_receiver(statuses=statuses) as receiver:
        api, blocking = blocking_api(make_api)
        blocking.release.set()
        status = submit(api, {**BODY, "webhook_url": receiver.url})
        webhook = _wait_for_webhook(api, status["status_url"])
    assert {name: webhook[name] for name in expected} == expected
    assert len(receiver.deliveries) == expected["attempts"]


def _wait_for_webhook(api: ApiHarness, status_url: str) -> dict[str, Any]:
    """The status reply's `webhook` once its delivery has ended."""
    for _ in range(500):
        webhook = api.client.get(status_url).json().get("webhook")
        if webhook is not None and webhook["status"] != "pending":
            return webhook
        time.sleep(0.02)
    raise AssertionError(f"the webhook of {status_url} is still pending: {webhook}")


def test_webhooks_need_a_secret(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(webhook_secret="")
    reply = api.client.post(JOBS, json={**BODY, "webhook_url": "https://example.com/hook"})
    assert reply.status_code == 422
    assert reply.json()["detail"]["fields"][0]["loc"] == ["body", "webhook_url"]
    assert "WEBHOOK_SECRET" in reply.json()["detail"]["fields"][0]["message"]


@pytest.mark.parametrize(
    ("url", "overrides", "why"),
    [
        (None, {"webhook_allow_private_networks": False}, "non-public address"),
        ("https://no-such-host.invalid/hook", {}, "does not resolve"),
        ("http://hooks.example.com/hook", {"webhook_allow_http": False}, "https://"),
    ],
)
def test_a_webhook_destination_that_would_be_refused_is_a_422_at_submit(
    make_api: Callable[..., ApiHarness], url: str | None, overrides: dict[str, Any], why: str
) -> None:
    with webhook_receiver() as receiver:
        overrides.setdefault("webhook_allow_private_networks", False)
        api, blocking = blocking_api(make_api, **overrides)
        blocking.release.set()
        reply = api.client.post(JOBS, json={**BODY, "webhook_url": url or receiver.url})
        assert reply.status_code == 422
        detail = reply.json()["detail"]
        assert detail["fields"][0]["loc"] == ["body", "webhook_url"]
        assert why in detail["fields"][0]["message"]
        assert blocking.calls == 0  # refused before anything was queued
        assert receiver.deliveries == []


# ----------------------------------------------------------------- idempotency


def test_idempotency_key_returns_the_same_generation(make_api: Callable[..., ApiHarness]) -> None:
    api, blocking = blocking_api(make_api)
    blocking.release.set()
    first = submit(api, BODY, **{"Idempotency-Key": "order-42"})
    # The same body written differently is the same request.
    reordered = dict(reversed(list(BODY.items())))
    again = submit(api, reordered, **{"Idempotency-Key": "order-42"})
    assert again["generation_id"] == first["generation_id"]
    other = api.client.post(JOBS, json={**BODY, "seed": 6}, headers={"Idempotency-Key": "order-42"})
    assert other.status_code == 422
    assert other.json()["detail"]["fields"][0]["loc"] == ["header", "Idempotency-Key"]
    fresh = submit(api, BODY, **{"Idempotency-Key": "order-43"})
    assert fresh["generation_id"] != first["generation_id"]


def test_idempotency_key_on_the_sync_route_replays_the_reply(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api()
    headers = {"Idempotency-Key": "sync-1"}
    first = api.client.post(GENERATE, json=BODY, headers=headers)
    again = api.client.post(GENERATE, json=BODY, headers=headers)
    assert first.status_code == again.status_code == 200
    assert [i["id"] for i in again.json()["images"]] == [i["id"] for i in first.json()["images"]]
    assert [i["base64"] for i in again.json()["images"]] == [
        i["base64"] for i in first.json()["images"]
    ]
    assert api.client.post(GENERATE, json={**BODY, "seed": 1}, headers=headers).status_code == 422


@pytest.mark.parametrize("key", [b"", b"x" * 256, "caf\u00e9".encode(), b"a\x7fb"])
def test_malformed_idempotency_keys_are_422(
    make_api: Callable[..., ApiHarness], key: bytes
) -> None:
    api = make_api()
    reply = api.client.post(JOBS, json=BODY, headers={"Idempotency-Key": key})
    assert reply.status_code == 422
    assert reply.json()["detail"]["fields"][0]["loc"] == ["header", "Idempotency-Key"]


# ---------------------------------------------------------------- backpressure


def test_a_full_queue_answers_429_on_both_routes_without_touching_the_generator(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = blocking_api(make_api, max_queued_generations=2)
    running = submit(api)
    wait_until(api, running["status_url"], lambda s: s["status"] == "running")
    waiting = [submit(api), submit(api)]
    calls_before = blocking.calls
    refused = [api.client.post(JOBS, json=BODY), api.client.post(GENERATE, json=BODY)]
    for reply in refused:
        assert reply.status_code == 429
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.json()["detail"]["error"] == "QueueFull"
    assert blocking.calls == calls_before
    blocking.release.set()
    for status in (running, *waiting):
        assert wait_until(api, status["status_url"], finished)["status"] == "succeeded"
    assert api.client.post(GENERATE, json=BODY).status_code == 200  # taken again once drained
    metrics = api.client.get("/metrics").text
    assert "mv_generations_rejected_total 2.0" in metrics


def test_retry_after_follows_recent_generation_times(make_api: Callable[..., ApiHarness]) -> None:
    api, blocking = blocking_api(make_api, max_queued_generations=1)
    queue = api.client.app.state.generation_queue
    queue._recent_seconds = 42.0  # as if recent generations took 42 s each
    running = submit(api)
    wait_until(api, running["status_url"], lambda s: s["status"] == "running")
    submit(api)
    refused = api.client.post(JOBS, json=BODY)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "42"
    blocking.release.set()


# ------------------------------------------------------------------- recovery


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_records_left_running_by_a_crash_are_failed_at_start_up(
    make_api: Callable[..., ApiHarness], make_settings: Callable[..., Any], mode: str
) -> None:
    first = make_api(mode)
    storage = first.client.app.state.assets.storage
    record = GenerationRecord(
        generation_id=str(uuid.uuid4()),
        status="running",
        request={"character_description": "left behind"},
        instance=first.settings.instance_name,
    )
    storage.put_bytes(
        generation_key(record.generation_id), record.model_dump_json().encode(), "application/json"
    )
    storage.put_bytes(
        active_prefix(record.instance) + record.generation_id, b"", "application/octet-stream"
    )
    # The same instance starts again on the same storage.
    overrides = {"output_dir": first.settings.output_dir}
    if mode == "s3":
        overrides["storage_bucket"] = first.settings.storage_bucket
    again = make_api(mode, **overrides)
    status = wait_until(again, f"{JOBS}/{record.generation_id}", finished, timeout=10)
    assert status["status"] == "failed"
    assert status["error"]["error"] == "Interrupted"
    # The marker goes right after the failed record is written (never before it).
    deadline = time.monotonic() + 5
    while storage.list_keys(active_prefix(record.instance)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.list_keys(active_prefix(record.instance)) == []


def test_a_replay_gives_up_on_a_generation_another_replica_left_running(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(generation_timeout_seconds=0.5)
    storage = api.client.app.state.assets.storage
    record = GenerationRecord(
        generation_id=str(uuid.uuid4()),
        status="running",
        request={"character_description": "elsewhere"},
        instance="another-replica",
    )
    storage.put_bytes(
        generation_key(record.generation_id), record.model_dump_json().encode(), "application/json"
    )
    service = api.client.app.state.generations
    assert api.client.portal is not None
    with pytest.raises(GenerationTimeoutError, match="still running on another replica"):
        api.client.portal.call(service.result, record.generation_id)

"""The API's side of the worker tier, without Ray: settings, an unreachable worker, and the
replies a real worker cannot be made to send (through a fake HTTP layer, fake_worker.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from config import BACKEND_DIR, SettingsError
from conftest import ApiHarness, free_port, wait_until
from fake_replicate import FakeReplicate, png_bytes
from fake_worker import TOKEN, FakeWorker, good_events, stream
from services.generation.worker_protocol import (
    Accepted,
    Done,
    EncodedImage,
    EventReader,
    Failed,
    Progress,
    encode_event,
)

GENERATE = "/api/mv/generate_character_reference"
JOBS = "/api/mv/character_reference_jobs"
BODY = {"character_description": "a silver robot", "num_images": 2, "seed": 3}
WORKER_URL = "http://worker.internal:8001"


@pytest.fixture
def worker_api(make_api: Callable[..., ApiHarness]) -> Callable[..., ApiHarness]:
    """An API in worker mode in front of a FakeWorker (or the given transport)."""

    def factory(worker: FakeWorker | None = None, **overrides: object) -> ApiHarness:
        overrides.setdefault("image_generator", "worker")
        overrides.setdefault("worker_url", WORKER_URL)
        overrides.setdefault("worker_token", TOKEN)
        return make_api(worker=(worker or FakeWorker()).transport(), **overrides)

    return factory


def stored_images(api: ApiHarness) -> list[str]:
    """Keys of every stored character reference."""
    storage = api.client.app.state.assets.storage
    return list(storage.list_keys("character_references/"))


# ------------------------------------------------------------------ settings


def test_worker_settings_are_checked_at_start_up(make_settings: Callable[..., object]) -> None:
    with pytest.raises(SettingsError, match="WORKER_URL must be set"):
        make_settings(image_generator="worker")
    with pytest.raises(SettingsError, match="WORKER_TOKEN=<hidden>: must be at least 16"):
        make_settings(worker_url=WORKER_URL, worker_token="short")
    with pytest.raises(SettingsError, match="WORKER_URL='ftp://x'"):
        make_settings(worker_url="ftp://x")
    with pytest.raises(SettingsError, match="OVERFLOW_TO_REPLICATE=true needs REPLICATE_API"):
        make_settings(worker_url=WORKER_URL, overflow_to_replicate=True)
    with pytest.raises(SettingsError, match="WORKER_MAX_BATCH_IMAGES"):
        make_settings(worker_max_batch_images=7)  # a request's 8 view images are never split


def test_generation_workers_default_to_enough_for_the_worker_to_batch(
    make_settings: Callable[..., object],
) -> None:
    unset = {"generation_workers": None}  # .env.test sets 1
    assert make_settings(**unset).effective_generation_workers == 1
    assert make_settings(worker_url=WORKER_URL, **unset).effective_generation_workers == 16
    explicit = make_settings(worker_url=WORKER_URL, generation_workers=3)
    assert explicit.effective_generation_workers == 3


def test_the_worker_app_refuses_to_start_without_a_token(
    make_settings: Callable[..., object],
) -> None:
    from gpu_worker.app import build_app

    with pytest.raises(SettingsError, match="WORKER_TOKEN must be set"):
        build_app(settings=make_settings())
    with pytest.raises(ValueError, match="worker_max_batch_images"):
        build_app({"worker_max_batch_images": 2}, settings=make_settings(worker_token=TOKEN))


# ------------------------------------------------------------------ replies


def test_images_from_the_worker_are_stored_with_how_they_were_made(
    worker_api: Callable[..., ApiHarness],
) -> None:
    api = worker_api()
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "worker"
    assert metadata["model_used"] == "fake/model"
    assert metadata["fallback_reason"] is None
    assert metadata["parameters_used"]["batch_images"] == 2
    assert metadata["parameters_used"]["worker_replica"] == "fake-replica"
    for image in reply.json()["images"]:
        served = api.client.get(image["url"])
        assert served.content == png_bytes(image["seed"])  # the worker's bytes, not re-encoded
        sidecar = api.client.get(f"/api/mv/character_references/{image['id']}/metadata").json()
        assert sidecar["backend"] == "worker"


def test_an_unreachable_worker_is_a_503_naming_worker_url(
    make_api: Callable[..., ApiHarness],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    api = make_api(image_generator="worker", worker_url=url, worker_token=TOKEN)
    ready = api.client.get("/ready")
    assert ready.status_code == 503
    assert any(f"WORKER_URL={url}" in problem for problem in ready.json()["problems"])
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 503
    assert f"WORKER_URL={url} is unreachable" in reply.json()["detail"]["message"]
    assert stored_images(api) == []


def test_auto_falls_back_from_an_unreachable_worker_to_the_next_generator(
    make_api: Callable[..., ApiHarness],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    api = make_api(worker_url=url, worker_token=TOKEN)  # auto: worker, then local on the CPU
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"]["backend"] == "local"
    assert f"WORKER_URL={url} is unreachable" in reply.json()["metadata"]["fallback_reason"]
    ready = api.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert "requests fall back to local" in ready.json()["warnings"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the order without CUDA")
def test_auto_without_cuda_falls_back_from_the_worker_to_replicate(
    make_api: Callable[..., ApiHarness],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    api = make_api(
        worker_url=url, worker_token=TOKEN, local_device="auto", replicate=FakeReplicate()
    )
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "replicate"
    assert "worker:" in metadata["fallback_reason"]
    assert "local: no CUDA device" in metadata["fallback_reason"]


@pytest.mark.parametrize(
    ("token", "what"),
    [("wrong-token-0123456789", "is not the worker's token"), (None, "is missing")],
)
def test_a_refused_token_is_reported_by_name(
    worker_api: Callable[..., ApiHarness], token: str | None, what: str
) -> None:
    api = worker_api(worker_token=token)
    ready = api.client.get("/ready")
    assert ready.status_code == 503
    assert any(f"WORKER_TOKEN {what}" in problem for problem in ready.json()["problems"])
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 503
    assert f"WORKER_TOKEN {what}" in reply.json()["detail"]["message"]


def test_a_worker_with_no_replica_ready_is_a_503(worker_api: Callable[..., ApiHarness]) -> None:
    api = worker_api(FakeWorker(ready_status=503))
    ready = api.client.get("/ready")
    assert ready.status_code == 503
    assert "is not ready: no worker replica answered" in ready.json()["problems"][0]


def busy(body: dict) -> httpx.Response:
    """The worker's reply when Serve sheds the request."""
    detail = {"error": "WorkerBusy", "message": "every worker replica is busy"}
    return httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": detail})


def test_a_worker_that_sheds_load_is_a_429_with_its_retry_after(
    worker_api: Callable[..., ApiHarness],
) -> None:
    worker = FakeWorker(replies=[busy])
    api = worker_api(worker)
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 429
    assert reply.headers["Retry-After"] == "7"
    assert reply.json()["detail"]["error"] == "WorkerBusy"
    assert "is at capacity" in reply.json()["detail"]["message"]
    assert worker.generate_calls == 1  # the sync route answers at once: its caller retries


# ------------------------------------------------ async generations wait out shedding


def busy_for(seconds: int, calls: list[float]) -> Callable[[dict], httpx.Response]:
    """A shedding reply with Retry-After `seconds`, noting when it was asked for."""

    def reply(body: dict) -> httpx.Response:
        calls.append(time.monotonic())
        detail = {"error": "WorkerBusy", "message": "every worker replica is busy"}
        return httpx.Response(429, headers={"Retry-After": str(seconds)}, json={"detail": detail})

    return reply


def status_of(api: ApiHarness, status_url: str) -> dict:
    reply = api.client.get(status_url)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_an_async_generation_the_worker_sheds_waits_queued_then_runs(
    worker_api: Callable[..., ApiHarness],
) -> None:
    shed_at: list[float] = []
    worker = FakeWorker(replies=[busy_for(1, shed_at), busy_for(1, shed_at)])
    api = worker_api(worker)
    submitted = api.client.post(JOBS, json=BODY)
    assert submitted.status_code == 202, submitted.text
    status_url = submitted.json()["status_url"]

    # Shed once: queued again (no place in this replica's queue: the worker tier's), waiting.
    wait_until(
        lambda: worker.generate_calls == 1 and status_of(api, status_url)["status"] == "queued"
    )
    waiting = status_of(api, status_url)
    assert waiting["queue_position"] is None and waiting["started_at"] is not None
    # The stored record says so too: every replica's status route reads it.
    stored = api.settings.output_dir / f"generations/{waiting['generation_id']}.json"
    wait_until(lambda: json.loads(stored.read_bytes())["status"] == "queued")

    wait_until(lambda: status_of(api, status_url)["status"] == "succeeded")
    finished = status_of(api, status_url)
    assert finished["result"]["metadata"]["backend"] == "worker"
    assert [image["seed"] for image in finished["result"]["images"]] == [3, 4]
    assert worker.generate_calls == 3
    assert shed_at[1] - shed_at[0] >= 1  # never sooner than the worker's Retry-After
    # The generation's time is the attempt that ran, not the waits for room (2 s and more):
    # the metric and the queue's Retry-After estimate are not inflated by shedding.
    metrics = api.client.get("/metrics").text
    (seconds,) = [
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith('mv_generation_duration_seconds_sum{backend="worker"}')
    ]
    assert seconds < shed_at[1] - shed_at[0]


def test_an_async_generation_shed_past_its_deadline_fails_with_the_timeout(
    worker_api: Callable[..., ApiHarness],
) -> None:
    shed_at: list[float] = []
    worker = FakeWorker(replies=[busy_for(1, shed_at) for _ in range(10)])
    api = worker_api(worker, generation_timeout_seconds=1.5)
    status_url = api.client.post(JOBS, json=BODY).json()["status_url"]
    wait_until(lambda: status_of(api, status_url)["status"] == "failed")
    error = status_of(api, status_url)["error"]
    assert error["status_code"] == 504 and error["error"] == "GenerationTimeout"
    assert error["message"].startswith("the generation did not start within 1.5 s: ")
    assert "is at capacity" in error["message"]
    assert worker.generate_calls == 2  # at 0 s and after 1 s; a third would pass 1.5 s
    assert stored_images(api) == []


def test_an_async_generation_waiting_out_shedding_can_be_canceled(
    worker_api: Callable[..., ApiHarness],
) -> None:
    worker = FakeWorker(replies=[busy_for(30, [])])  # half of the 60 s deadline
    api = worker_api(worker)
    status_url = api.client.post(JOBS, json=BODY).json()["status_url"]
    wait_until(
        lambda: worker.generate_calls == 1 and status_of(api, status_url)["status"] == "queued"
    )
    canceled = api.client.delete(status_url)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert status_of(api, status_url)["status"] == "canceled"
    assert worker.generate_calls == 1


def test_a_shedding_worker_is_not_a_failure_in_auto(make_api: Callable[..., ApiHarness]) -> None:
    worker = FakeWorker(replies=[busy])
    api = make_api(worker_url=WORKER_URL, worker_token=TOKEN, worker=worker.transport())
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 429  # not handed to the local pipeline behind it
    assert reply.json()["detail"]["error"] == "WorkerBusy"


def test_overflow_to_replicate_runs_what_the_worker_sheds(
    worker_api: Callable[..., ApiHarness],
) -> None:
    replicate = FakeReplicate()
    api = worker_api(FakeWorker(replies=[busy]), replicate=replicate, overflow_to_replicate=True)
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "replicate"
    assert "at capacity" in metadata["fallback_reason"]
    assert "overflow to replicate" in metadata["fallback_reason"]
    assert len(replicate.inputs) == 2
    # Overflow is for load only: a request naming replicate is still refused in worker mode.
    refused = api.client.post(GENERATE, json={**BODY, "backend": "replicate"})
    assert refused.status_code == 422


def cut_short(body: dict) -> httpx.Response:
    """A stream that ends mid-generation: the worker replica died."""
    return stream(Accepted(replica="r"), Progress(step=1, total_steps=4))


def out_of_memory(body: dict) -> httpx.Response:
    """The worker's GPU ran out of memory."""
    failed = Failed(error="OutOfMemory", message="the GPU ran out of memory generating 2 image(s)")
    return stream(Accepted(replica="r"), failed)


def unreadable(body: dict) -> httpx.Response:
    """An event line that is not JSON."""
    return stream(Accepted(replica="r"), b"<html>proxy error</html>\n")


def other_seeds(body: dict) -> httpx.Response:
    """Images for seeds the request did not ask for."""
    return stream(*good_events({"seeds": [s + 100 for s in body["seeds"]]}))


def not_a_worker(body: dict) -> httpx.Response:
    """Some other service at WORKER_URL."""
    return httpx.Response(200, json={"hello": "world"})


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (cut_short, "stopped before the generation finished"),
        (out_of_memory, "ran out of memory"),
        (unreadable, "sent an unreadable event"),
        (other_seeds, "sent images for other seeds"),
        (not_a_worker, "is not a worker tier"),
    ],
)
def test_a_broken_worker_reply_is_a_503_and_stores_nothing(
    worker_api: Callable[..., ApiHarness],
    reply: Callable[[dict], httpx.Response],
    message: str,
) -> None:
    api = worker_api(FakeWorker(replies=[reply]))
    answer = api.client.post(GENERATE, json=BODY)
    assert answer.status_code == 503
    assert message in answer.json()["detail"]["message"]
    assert f"WORKER_URL={WORKER_URL}" in answer.json()["detail"]["message"]
    assert "Traceback" not in answer.text
    assert stored_images(api) == []
    # The next request, answered properly, succeeds.
    assert api.client.post(GENERATE, json=BODY).status_code == 200


def test_a_worker_that_keeps_running_out_of_memory_makes_ready_degraded(
    worker_api: Callable[..., ApiHarness],
) -> None:
    api = worker_api(FakeWorker(replies=[out_of_memory] * 3))
    for _ in range(3):
        assert api.client.post(GENERATE, json=BODY).status_code == 503
    ready = api.client.get("/ready").json()
    assert ready["status"] == "degraded"
    assert ready["warnings"] == ["worker: out of memory on the last 3 generations; requests fail"]


def test_the_serve_config_file_deploys_the_worker_app(make_settings: Callable[..., object]) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gpu_worker.app import build_app
    from gpu_worker.deployments import BatchConfig, DiffusionWorker, WorkerIngress

    raw = yaml.safe_load((BACKEND_DIR / "gpu_worker" / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (application,) = config.applications
    assert application.import_path == "gpu_worker.app:build_app"
    build_app(application.args, settings=make_settings(worker_token=TOKEN))  # args accepted
    deployments = {deployment.name: deployment for deployment in application.deployments}
    assert set(deployments) == {DiffusionWorker.name, WorkerIngress.name}
    worker = deployments[DiffusionWorker.name]
    assert worker.ray_actor_options.num_gpus == 1
    assert worker.max_queued_requests > 0
    autoscaling = dict(worker.autoscaling_config)
    assert autoscaling["min_replicas"] >= 1 and autoscaling["max_replicas"] > 1
    assert autoscaling["target_ongoing_requests"] > 0
    batch = BatchConfig.model_validate(worker.user_config)
    assert batch.max_batch_images >= 8 and batch.batch_wait_seconds > 0
    assert config.http_options.port == 8001


# ------------------------------------------------------------------ the stream's framing


STREAM = [
    Accepted(replica="r1"),
    Progress(step=1, total_steps=2),
    EncodedImage(7, "image/png", png_bytes(7) + b"\n\n{not json}\n"),  # bytes are not lines
    EncodedImage(8, "image/webp", b"\x00" * 70_000),
    Done(model="m", parameters={"batch_images": 2}),
]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=30))
def test_events_read_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    body = b"".join(encode_event(event) for event in STREAM)
    reader = EventReader()
    events = []
    previous = 0
    for cut in [*sorted({min(cut, len(body)) for cut in cuts}), len(body)]:
        events += reader.feed(body[previous:cut])
        previous = cut
    assert events == STREAM
    assert reader.complete


def test_a_stream_cut_inside_an_image_is_incomplete() -> None:
    body = b"".join(encode_event(event) for event in STREAM[:3])
    reader = EventReader()
    assert reader.feed(body[:-5]) == STREAM[:2]
    assert not reader.complete


def test_a_line_longer_than_any_event_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than any event"):
        EventReader().feed(b"x" * (70 * 1024))

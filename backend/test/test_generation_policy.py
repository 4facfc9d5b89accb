"""The generation policy through the API: fallback, 503, 502, 429 and 504."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import ApiHarness, BlockingGenerator, out_of_memory_loader, wait_until
from fake_replicate import FakeReplicate
from services.generation.base import GenerationRequest, GenerationTimeoutError
from services.generation.diffusion import load_pipeline
from services.generation.policy import GenerationPolicy

GENERATE = "/api/mv/generate_character_reference"
BODY = {"character_description": "a silver robot", "num_images": 2, "seed": 3}


def test_auto_falls_back_to_replicate_when_local_runs_out_of_memory(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(replicate=FakeReplicate(), local_loader=out_of_memory_loader)
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "replicate"
    assert "ran out of memory" in metadata["fallback_reason"]
    assert [image["seed"] for image in reply.json()["images"]] == [3, 4]
    image_id = reply.json()["images"][0]["id"]
    sidecar = api.client.get(f"/api/mv/character_references/{image_id}/metadata").json()
    assert "ran out of memory" in sidecar["fallback_reason"]
    assert sidecar["backend"] == "replicate"


def test_auto_without_cuda_uses_replicate_and_says_why(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(replicate=FakeReplicate(), local_device="auto")
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"]["backend"] == "replicate"
    assert "no CUDA device" in reply.json()["metadata"]["fallback_reason"]


def test_out_of_memory_without_a_fallback_is_a_503(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(local_loader=out_of_memory_loader)
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 503
    assert "ran out of memory" in reply.json()["detail"]["message"]


def test_no_generator_at_all_is_a_503_naming_what_to_configure(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(local_device="auto")  # no CUDA here, no Replicate token
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 503
    detail = reply.json()["detail"]
    assert detail["error"] == "GeneratorUnavailable"
    assert "REPLICATE_API_TOKEN" in detail["message"]
    assert "LOCAL_DEVICE=cpu" in detail["message"]


def test_an_async_submit_is_refused_up_front_when_no_generator_can_run(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(local_device="auto")  # no CUDA here, no Replicate token
    assert api.client.post(GENERATE, json=BODY).status_code == 503  # waits for the load
    reply = api.client.post("/api/mv/character_reference_jobs", json=BODY)
    assert reply.status_code == 503
    detail = reply.json()["detail"]
    assert detail["error"] == "GeneratorUnavailable"
    assert "make run-tiny" in detail["message"]
    assert "REPLICATE_API_TOKEN" in detail["message"]
    assert "location" not in reply.headers  # nothing was queued


def test_an_async_submit_waits_for_a_model_that_is_still_loading(
    make_api: Callable[..., ApiHarness],
) -> None:
    loading = threading.Event()
    release = threading.Event()

    def slow_loader(model_id: str, device: str) -> Any:
        loading.set()
        release.wait(30)
        return load_pipeline(model_id, device)

    api = make_api(local_loader=slow_loader)
    assert loading.wait(30)
    reply = api.client.post("/api/mv/character_reference_jobs", json=BODY)
    assert reply.status_code == 202  # it may still load: accepted, not refused
    release.set()
    status_url = reply.json()["status_url"]
    wait_until(lambda: api.client.get(status_url).json()["status"] == "succeeded", timeout=60)


def test_replicate_mode_without_a_token_is_a_503_naming_it(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(image_generator="replicate")
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 503
    assert "set REPLICATE_API_TOKEN" in reply.json()["detail"]["message"]


def test_a_backend_this_server_does_not_offer_is_a_422_naming_the_field(
    make_api: Callable[..., ApiHarness],
) -> None:
    disabled = make_api(image_generator="local")
    unconfigured = make_api(image_generator="auto")  # no Replicate token
    for api, why in ((disabled, "IMAGE_GENERATOR=local"), (unconfigured, "REPLICATE_API_TOKEN")):
        for route in (GENERATE, "/api/mv/character_reference_jobs"):
            reply = api.client.post(route, json={**BODY, "backend": "replicate"})
            assert reply.status_code == 422
            detail = reply.json()["detail"]["fields"][0]
            assert detail["loc"] == ["body", "backend"]
            assert why in detail["message"]


def test_backend_replicate_skips_the_local_model(make_api: Callable[..., ApiHarness]) -> None:
    fake = FakeReplicate()
    api = make_api(replicate=fake)
    reply = api.client.post(GENERATE, json={**BODY, "backend": "replicate"})
    assert reply.json()["metadata"]["backend"] == "replicate"
    assert reply.json()["metadata"]["fallback_reason"] is None
    assert len(fake.inputs) == 2


def test_provider_5xx_until_retries_run_out_is_a_502(make_api: Callable[..., ApiHarness]) -> None:
    fake = FakeReplicate(create_replies=[httpx.Response(500, json={}) for _ in range(10)])
    api = make_api(image_generator="replicate", replicate=fake, replicate_max_attempts=2)
    reply = api.client.post(GENERATE, json={**BODY, "num_images": 1})
    assert reply.status_code == 502
    assert reply.json()["detail"]["error"] == "ProviderError"
    assert "after 2 attempt" in reply.json()["detail"]["message"]
    assert len(fake.prediction_posts) == 2


def test_provider_non_image_bytes_are_a_502(make_api: Callable[..., ApiHarness]) -> None:
    fake = FakeReplicate(output_for=lambda seed: b"GIF89a not really")
    api = make_api(image_generator="replicate", replicate=fake)
    reply = api.client.post(GENERATE, json=BODY)
    assert reply.status_code == 502
    assert "unusable image" in reply.json()["detail"]["message"]


def test_provider_429_then_success_is_a_200(make_api: Callable[..., ApiHarness]) -> None:
    fake = FakeReplicate(create_replies=[httpx.Response(429, headers={"Retry-After": "0"})])
    api = make_api(image_generator="replicate", replicate=fake)
    reply = api.client.post(GENERATE, json={**BODY, "num_images": 1, "output_format": "webp"})
    assert reply.status_code == 200, reply.text
    # The provider's PNG was re-encoded into the format asked for.
    assert reply.json()["images"][0]["content_type"] == "image/webp"


def test_a_request_past_its_deadline_is_a_504(make_api: Callable[..., ApiHarness]) -> None:
    blocking = BlockingGenerator()
    api = make_api(
        image_generator="replicate",
        generation_timeout_seconds=0.3,
        generators={"replicate": blocking},
    )
    reply = api.client.post(GENERATE, json=BODY)
    blocking.release.set()
    assert reply.status_code == 504
    assert reply.json()["detail"]["error"] == "GenerationTimeout"


async def test_the_policy_serves_again_after_a_deadline() -> None:
    blocking = BlockingGenerator()
    policy = GenerationPolicy("replicate", {"replicate": blocking}, timeout_seconds=0.2)
    request = GenerationRequest.of_prompt("p", (1,), "1:1")
    with pytest.raises(GenerationTimeoutError, match="did not finish"):
        await policy.generate(request)
    blocking.release.set()
    assert len((await policy.generate(request)).result.images) == 1

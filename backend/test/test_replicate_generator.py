"""ReplicateGenerator: the real replicate client against a fake HTTP layer."""

from __future__ import annotations

import time

import httpx
import pytest

from fake_replicate import DELIVERY, FakeReplicate, png_bytes
from services.asset_persistence import identify_image
from services.backoff import parse_retry_after
from services.generation.base import GenerationRequest, ProviderError
from services.generation.generators.replicate import (
    ReplicateGenerator,
    is_delivery_url,
    replicate_inputs,
)

MODEL = "black-forest-labs/flux-schnell"


def make_request(seeds: tuple[int, ...] = (100, 101, 102, 103)) -> GenerationRequest:
    """A request for one image per seed."""
    return GenerationRequest.of_prompt("a robot", seeds, "16:9", negative_prompt="blurry")


def generator_for(fake: FakeReplicate, **options: object) -> ReplicateGenerator:
    """A generator whose client talks to `fake`, with short backoffs."""
    options.setdefault("backoff_base", 0.01)
    return ReplicateGenerator(
        "r8_test-token", fake.model, transport=fake.transport(), poll_interval=0.01, **options
    )


async def test_success_one_prediction_per_seed_with_mapped_inputs() -> None:
    fake = FakeReplicate()
    result = await generator_for(fake).generate(make_request())
    assert [image.seed for image in result.images] == [100, 101, 102, 103]
    assert sorted(body["seed"] for body in fake.inputs) == [100, 101, 102, 103]
    assert fake.inputs[0] | {"seed": 0} == {
        "prompt": "a robot",
        "num_outputs": 1,
        "aspect_ratio": "16:9",
        "seed": 0,
        "output_format": "png",
        "output_quality": 95,
    }
    for image in result.images:
        assert image.encoded == png_bytes(image.seed)
    post = fake.prediction_posts[0]
    assert post.headers["Authorization"] == "Bearer r8_test-token"
    assert post.headers["Prefer"].startswith("wait")
    assert result.backend == "replicate"
    assert result.model == MODEL


async def test_polls_a_prediction_that_is_still_starting() -> None:
    fake = FakeReplicate(initial_status="starting")
    result = await generator_for(fake).generate(make_request((5,)))
    assert result.images[0].encoded == png_bytes(5)
    assert any(r.url.path.startswith("/v1/predictions/") for r in fake.requests)


async def test_429_then_success_waits_for_retry_after() -> None:
    fake = FakeReplicate(
        create_replies=[httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": "slow"})]
    )
    started = time.monotonic()
    result = await generator_for(fake).generate(make_request((9,)))
    assert time.monotonic() - started >= 1.0
    assert len(fake.prediction_posts) == 2
    assert result.images[0].encoded == png_bytes(9)


async def test_5xx_until_attempts_run_out_is_a_provider_error() -> None:
    fake = FakeReplicate(create_replies=[httpx.Response(503, json={}) for _ in range(3)])
    with pytest.raises(ProviderError, match="after 3 attempt"):
        await generator_for(fake, max_attempts=3).generate(make_request((1,)))
    assert len(fake.prediction_posts) == 3


async def test_a_network_error_is_retried() -> None:
    fake = FakeReplicate()
    inner = fake.transport()
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return inner.handle_request(request)

    generator = ReplicateGenerator(
        "r8_x", MODEL, transport=httpx.MockTransport(flaky), backoff_base=0.01
    )
    result = await generator.generate(make_request((4,)))
    assert result.images[0].encoded == png_bytes(4)


async def test_a_refused_request_is_not_retried() -> None:
    fake = FakeReplicate(create_replies=[httpx.Response(401, json={"title": "Unauthenticated"})])
    with pytest.raises(ProviderError, match="HTTP 401"):
        await generator_for(fake).generate(make_request((1,)))
    assert len(fake.prediction_posts) == 1


async def test_failed_prediction_is_a_provider_error() -> None:
    fake = FakeReplicate(initial_status="starting", final_status="failed")
    with pytest.raises(ProviderError, match="prediction failed"):
        await generator_for(fake).generate(make_request((1,)))


async def test_non_image_output_is_refused() -> None:
    fake = FakeReplicate(output_for=lambda seed: b"<html>not an image</html>")
    with pytest.raises(ProviderError, match="unusable image"):
        await generator_for(fake).generate(make_request((1,)))


async def test_truncated_image_output_is_refused() -> None:
    fake = FakeReplicate(output_for=lambda seed: png_bytes(seed, (256, 256))[:400])
    with pytest.raises(ProviderError, match="corrupt or truncated"):
        await generator_for(fake).generate(make_request((1,)))


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/out.png",
        "http://replicate.delivery/xezq/out.png",  # not https
        "https://replicate.delivery.evil.com/out.png",
        "https://127.0.0.1/out.png",
    ],
)
async def test_outputs_from_foreign_hosts_are_refused(url: str) -> None:
    fake = FakeReplicate(output_url_for=lambda name: url)
    with pytest.raises(ProviderError, match="outside its delivery hosts"):
        await generator_for(fake).generate(make_request((1,)))
    assert all(r.url.host == "api.replicate.com" for r in fake.requests)  # never fetched


async def test_oversized_output_is_refused() -> None:
    fake = FakeReplicate(output_for=lambda seed: png_bytes(seed, (512, 512)))
    with pytest.raises(ProviderError, match="larger than the allowed size"):
        await generator_for(fake, max_output_bytes=1000).generate(make_request((1,)))


async def test_download_5xx_is_retried() -> None:
    fake = FakeReplicate(delivery_replies=[httpx.Response(502)])
    result = await generator_for(fake).generate(make_request((3,)))
    assert result.images[0].encoded == png_bytes(3)


def test_subdomains_of_the_delivery_host_are_accepted() -> None:
    assert is_delivery_url(f"{DELIVERY}/a/out.webp")
    assert is_delivery_url("https://pbxt.replicate.delivery/a/out.webp")
    assert not is_delivery_url("https://notreplicate.delivery/a.png")


def test_retry_after_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_future = parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT")
    assert in_future is not None and in_future > 0


def test_non_flux_models_get_sizes_and_negative_prompt() -> None:
    inputs = replicate_inputs("stability-ai/sdxl", make_request(), 1)
    assert (inputs["width"], inputs["height"]) == (1344, 768)
    assert inputs["negative_prompt"] == "blurry"
    assert inputs["seed"] == 101


async def test_webp_output_is_kept_as_sent() -> None:
    fake = FakeReplicate(output_for=lambda seed: png_bytes(seed, image_format="WEBP"))
    request = GenerationRequest.of_prompt("a robot", (1,), "1:1", output_format="webp")
    result = await generator_for(fake).generate(request)
    assert fake.inputs[0]["output_format"] == "webp"
    assert result.images[0].encoded is not None
    assert identify_image(result.images[0].encoded).extension == "webp"


async def test_decompression_bomb_output_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    # Pillow refuses images over twice this many pixels; 64x48 stands in for a real bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    fake = FakeReplicate()
    with pytest.raises(ProviderError, match="too many pixels"):
        await generator_for(fake).generate(make_request((1,)))

"""DiffusersGenerator on tiny FLUX and SDXL pipelines, loaded through the real from_pretrained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import out_of_memory_loader
from mv.character_reference import ASPECT_RATIO_SIZES
from services.generation.base import (
    GenerationRequest,
    GenerationResult,
    GeneratorFailedError,
    OutOfMemoryError,
)
from services.generation.diffusion import load_pipeline, profile_for
from services.generation.generators.local import DiffusersGenerator

PROMPT = "a silver metallic humanoid robot with a red shield"


def make_request(seeds: tuple[int, ...], aspect_ratio: str = "1:1") -> GenerationRequest:
    """A request for one image per seed."""
    return GenerationRequest.of_prompt(PROMPT, seeds, aspect_ratio, negative_prompt="blurry")


def pixels(result: GenerationResult) -> np.ndarray:
    """All images of a result as one uint8 array."""
    return np.stack([np.asarray(image.pixels, dtype=np.int16) for image in result.images])


def loaded(model: Path) -> Iterator[DiffusersGenerator]:
    """A generator for `model` on the CPU, loaded before the first test uses it."""
    generator = DiffusersGenerator(str(model), "cpu")
    assert generator.load() is None
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def flux(tiny_flux: Path) -> Iterator[DiffusersGenerator]:
    """The tiny FLUX pipeline, loaded once for the module."""
    yield from loaded(tiny_flux)


@pytest.fixture(scope="module")
def sdxl_turbo(tiny_sdxl_turbo: Path) -> Iterator[DiffusersGenerator]:
    """The tiny SDXL-Turbo-style pipeline, loaded once for the module."""
    yield from loaded(tiny_sdxl_turbo)


async def test_flux_loads_with_schnell_defaults_and_makes_one_megapixel_images(
    flux: DiffusersGenerator,
) -> None:
    result = await flux.generate(make_request((1,)))
    assert flux.describe()["family"] == "flux-schnell"
    assert result.parameters["num_inference_steps"] == 4
    assert result.parameters["guidance_scale"] == 0.0
    assert result.parameters["negative_prompt_applied"] is False
    assert result.images[0].pixels is not None
    assert result.images[0].pixels.size == (1024, 1024)
    assert result.backend == "local"


async def test_same_seed_gives_identical_pixels(flux: DiffusersGenerator) -> None:
    first = await flux.generate(make_request((42, 43)))
    second = await flux.generate(make_request((42, 43)))
    assert np.array_equal(pixels(first), pixels(second))
    # Different seeds give different images.
    assert not np.array_equal(pixels(first)[0], pixels(first)[1])


@pytest.mark.parametrize("family", ["flux", "sdxl_turbo"])
async def test_batch_matches_single_calls_to_one_level(
    family: str, request: pytest.FixtureRequest
) -> None:
    generator: DiffusersGenerator = request.getfixturevalue(family)
    batch = await generator.generate(make_request((7, 8, 9, 10)))
    singles = [await generator.generate(make_request((seed,))) for seed in (7, 8, 9, 10)]
    batched = pixels(batch)
    single = np.concatenate([pixels(result) for result in singles])
    assert [image.seed for image in batch.images] == [7, 8, 9, 10]
    assert np.abs(batched - single).max() <= 1
    assert batched.std() > 5  # real images, not a constant that matches trivially


@pytest.mark.parametrize("aspect_ratio", ["16:9", "2:3", "21:9"])
async def test_sizes_follow_the_aspect_ratio_table(
    aspect_ratio: str, flux: DiffusersGenerator, sdxl_turbo: DiffusersGenerator
) -> None:
    width, height = ASPECT_RATIO_SIZES[aspect_ratio]
    flux_result = await flux.generate(make_request((3,), aspect_ratio))
    assert flux_result.images[0].pixels.size == (width, height)
    # SDXL-Turbo works at 512-class sizes: the same table at half scale.
    turbo_result = await sdxl_turbo.generate(make_request((3,), aspect_ratio))
    assert turbo_result.images[0].pixels.size == (width // 2, height // 2)
    assert sdxl_turbo.describe()["family"] == "sdxl-turbo"


async def test_a_model_that_does_not_load_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    generator = DiffusersGenerator(str(broken), "cpu")
    reason = await generator.unavailable_reason()
    assert reason is not None
    assert "failed to load" in reason
    assert generator.known_unavailable_reason() == reason
    with pytest.raises(GeneratorFailedError, match="failed to load"):
        await generator.generate(make_request((1,)))
    await generator.aclose()


@pytest.mark.parametrize("model_id", ["some-org/a-model-nobody-cached", "/no/such/model/dir"])
async def test_a_model_neither_local_nor_cached_says_so_offline(model_id: str) -> None:
    # The suite runs with HF_HUB_OFFLINE=1: the hub is out of reach, as on a machine offline.
    generator = DiffusersGenerator(model_id, "cpu")
    reason = await generator.unavailable_reason() or ""
    assert f"LOCAL_MODEL_ID={model_id} is neither a model directory nor" in reason
    assert "Hugging Face cache" in reason
    assert "HF_HUB_OFFLINE" in reason
    assert "make run-tiny" in reason
    assert "model_index.json" not in reason.split(";")[0]
    await generator.aclose()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
async def test_auto_device_without_cuda_says_how_to_use_the_cpu(tiny_flux: Path) -> None:
    generator = DiffusersGenerator(str(tiny_flux), "auto")
    reason = await generator.unavailable_reason() or ""
    assert "LOCAL_DEVICE=cpu" in reason
    assert "make run-tiny" in reason
    assert generator.describe()["state"] == "unavailable"
    await generator.aclose()


async def test_out_of_memory_becomes_a_clear_error(tiny_flux: Path) -> None:
    generator = DiffusersGenerator(str(tiny_flux), "cpu", loader=out_of_memory_loader)
    with pytest.raises(OutOfMemoryError, match="ran out of memory generating 4 image"):
        await generator.generate(make_request((1, 2, 3, 4)))
    # The generator stays usable for the next request (which fails the same way here).
    with pytest.raises(OutOfMemoryError):
        await generator.generate(make_request((1,)))
    await generator.aclose()


def test_profiles_by_family(tiny_flux: Path, tiny_sdxl_turbo: Path) -> None:
    flux_pipeline = load_pipeline(str(tiny_flux), "cpu")
    assert profile_for(flux_pipeline, "black-forest-labs/FLUX.1-schnell").family == "flux-schnell"
    sdxl_pipeline = load_pipeline(str(tiny_sdxl_turbo), "cpu")
    assert profile_for(sdxl_pipeline, "stabilityai/sdxl-turbo").size_scale == 0.5
    other = profile_for(sdxl_pipeline, "stabilityai/stable-diffusion-xl-base-1.0")
    assert other.num_inference_steps is None  # the pipeline's own defaults


@pytest.mark.gpu
async def test_tiny_pipeline_on_cuda_in_bf16(tiny_flux: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = DiffusersGenerator(str(tiny_flux), "cuda")
    assert await generator.unavailable_reason() is None
    first = await generator.generate(make_request((11, 12, 13, 14)))
    again = await generator.generate(make_request((11, 12, 13, 14)))
    assert generator.describe()["device"] == "cuda"
    assert [image.pixels.size for image in first.images] == [(1024, 1024)] * 4
    assert np.abs(pixels(first) - pixels(again)).max() <= 1
    await generator.aclose()

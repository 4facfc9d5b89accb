"""DiffusersGenerator: a diffusers text-to-image pipeline, loaded once, owned by one thread."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from config import BACKEND_DIR
from mv.character_reference import image_size
from services.generation.base import (
    GeneratedImage,
    GenerationCanceledError,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GeneratorFailedError,
    OutOfMemoryError,
)

logger = logging.getLogger(__name__)

DeviceSetting = Literal["auto", "cuda", "cpu"]
PipelineLoader = Callable[[str, str], Any]


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Per-family call defaults; None leaves the pipeline's own default."""

    family: str
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    size_scale: float = 1.0  # times the one-megapixel aspect-ratio table
    extra: dict[str, Any] = field(default_factory=dict)


def profile_for(pipeline: Any, model_id: str) -> ModelProfile:
    """The call defaults for the pipeline's model family."""
    kind = type(pipeline).__name__
    if kind.startswith("Flux"):
        transformer = getattr(pipeline, "transformer", None)
        if transformer is not None and not transformer.config.get("guidance_embeds", False):
            # Timestep-distilled (schnell): 4 steps, no guidance, 256 T5 tokens.
            return ModelProfile("flux-schnell", 4, 0.0, extra={"max_sequence_length": 256})
        return ModelProfile("flux")
    if "XL" in kind and "turbo" in Path(model_id).name.lower():
        # Adversarially distilled at 512x512: few steps, no classifier-free guidance.
        return ModelProfile("sdxl-turbo", 4, 0.0, size_scale=0.5)
    return ModelProfile(kind)


def resolve_model_source(model_id: str) -> str:
    """A local directory (absolute, or relative to backend/) as an absolute path; else a hub id."""
    for candidate in (Path(model_id).expanduser(), BACKEND_DIR / model_id):
        if candidate.is_dir():
            return str(candidate.resolve())
    return model_id


# Loading creates modules on the meta device by patching torch process-wide (accelerate's
# init_empty_weights), so two loads at once in one process corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()


def load_pipeline(model_id: str, device: str) -> Any:
    """Load `model_id` with AutoPipelineForText2Image: bf16 on CUDA, fp32 on the CPU."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars are for terminals; the server logs the load instead.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with _LOAD_LOCK:
        pipeline = AutoPipelineForText2Image.from_pretrained(
            resolve_model_source(model_id), dtype=dtype
        )
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DiffusersGenerator:
    """Runs every request on one worker thread that owns the pipeline.

    The model is loaded once, in the background, when `start()` is called; requests wait for
    that load. All images of a request go through one batched pipeline call, with one
    `torch.Generator` per image so that each seed reproduces its image alone.
    """

    name: Literal["local"] = "local"

    def __init__(
        self,
        model_id: str,
        device: DeviceSetting = "auto",
        *,
        loader: PipelineLoader = load_pipeline,
    ) -> None:
        self.model = model_id
        self.device_setting = device
        self.device: str | None = None
        self._loader = loader
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="diffusers")
        self._load: Future[None] | None = None
        self._pipeline: Any = None
        self._profile: ModelProfile | None = None
        self._unavailable: str | None = None
        self.load_seconds: float | None = None

    # ----------------------------------------------------------------- loading

    def start(self) -> None:
        """Begin loading the model on the worker thread (once)."""
        if self._load is None:
            self._load = self._worker.submit(self._load_on_worker)

    def _resolve_device(self) -> str | None:
        import torch

        if self.device_setting == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        if self.device_setting == "cuda":
            self._unavailable = "LOCAL_DEVICE=cuda but no CUDA device is available"
        else:
            self._unavailable = (
                "no CUDA device (LOCAL_DEVICE=auto); set LOCAL_DEVICE=cpu to run the local "
                "model on the CPU"
            )
        return None

    def _load_on_worker(self) -> None:
        started = time.perf_counter()
        try:
            self.device = self._resolve_device()
            if self.device is None:
                return
            pipeline = self._loader(self.model, self.device)
            self._profile = profile_for(pipeline, self.model)
            self._pipeline = pipeline
            self.load_seconds = time.perf_counter() - started
            logger.info(
                "loaded %s (%s) on %s in %.1f s",
                self.model,
                self._profile.family,
                self.device,
                self.load_seconds,
            )
        except Exception as error:  # any load failure makes the generator unavailable
            logger.exception("loading %s failed", self.model)
            self._unavailable = f"the local model {self.model!r} failed to load: {_brief(error)}"
            _free_accelerator_memory()

    def load(self) -> str | None:
        """Load now, blocking the caller (scripts, benchmarks); returns unavailable_reason."""
        self.start()
        assert self._load is not None
        self._load.result()
        return self._unavailable

    async def unavailable_reason(self) -> str | None:
        """None once the model is loaded; why not otherwise. Waits for a load in progress."""
        self.start()
        assert self._load is not None
        await asyncio.wrap_future(self._load)
        return self._unavailable

    @property
    def state(self) -> str:
        """loading, ready or unavailable."""
        if self._load is None or not self._load.done():
            return "loading"
        return "unavailable" if self._unavailable else "ready"

    def describe(self) -> dict[str, Any]:
        """Model, device, load state and family defaults."""
        return {
            "model": self.model,
            "device_setting": self.device_setting,
            "device": self.device,
            "state": self.state,
            "unavailable_reason": self._unavailable,
            "family": self._profile.family if self._profile else None,
        }

    # -------------------------------------------------------------- generation

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """Run the whole request as one batch on the worker thread, reporting each step."""
        reason = await self.unavailable_reason()
        if reason is not None:
            raise GeneratorFailedError(reason)
        loop = asyncio.get_running_loop()
        progress = progress or GenerationProgress()
        return await loop.run_in_executor(self._worker, self._generate_on_worker, request, progress)

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline (None before the load); benchmarks call it bare."""
        return self._pipeline

    def call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The exact keyword arguments the batched pipeline call gets for `request`."""
        import torch

        assert self._profile is not None
        profile = self._profile
        width, height = image_size(request.aspect_ratio, profile.size_scale)
        arguments: dict[str, Any] = {
            "prompt": [request.prompt] * request.num_images,
            "width": width,
            "height": height,
            # CPU generators: the same seed gives the same starting noise on any device.
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
            "output_type": "pil",
            **profile.extra,
        }
        if profile.num_inference_steps is not None:
            arguments["num_inference_steps"] = profile.num_inference_steps
        if profile.guidance_scale is not None:
            arguments["guidance_scale"] = profile.guidance_scale
        if request.negative_prompt and self._uses_negative_prompt():
            arguments["negative_prompt"] = [request.negative_prompt] * request.num_images
        return arguments

    def _uses_negative_prompt(self) -> bool:
        assert self._profile is not None
        if self._profile.family.startswith("flux"):
            return False  # guidance-distilled: FLUX has no negative branch at true_cfg 1
        accepts = "negative_prompt" in inspect.signature(self._pipeline.__call__).parameters
        guidance = self._profile.guidance_scale
        return accepts and (guidance is None or guidance > 1)

    def _generate_on_worker(
        self, request: GenerationRequest, progress: GenerationProgress
    ) -> GenerationResult:
        import torch

        progress.raise_if_canceled()  # canceled while waiting for the worker
        arguments = self.call_arguments(request)

        def on_step_end(pipeline: Any, step: int, _: Any, tensors: dict[str, Any]) -> Any:
            # Raising here is what stops a canceled generation at its next step.
            progress.advance(step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0))
            return tensors

        try:
            with torch.inference_mode():
                output = self._pipeline(**arguments, callback_on_step_end=on_step_end)
        except GenerationCanceledError:
            raise
        except torch.OutOfMemoryError:
            del arguments
            _free_accelerator_memory()
            raise OutOfMemoryError(
                f"the local GPU ran out of memory generating {request.num_images} image(s) "
                f"of {request.aspect_ratio}; try fewer images"
            ) from None
        except Exception as error:
            logger.exception("local generation failed")
            raise GeneratorFailedError(f"the local pipeline failed: {_brief(error)}") from None
        images = tuple(
            GeneratedImage(seed=seed, pixels=pixels)
            for seed, pixels in zip(request.seeds, output.images, strict=True)
        )
        assert self._profile is not None
        parameters = {
            "family": self._profile.family,
            "device": self.device,
            "width": arguments["width"],
            "height": arguments["height"],
            "num_inference_steps": arguments.get("num_inference_steps"),
            "guidance_scale": arguments.get("guidance_scale"),
            "negative_prompt_applied": "negative_prompt" in arguments,
        }
        return GenerationResult(images, self.model, "local", parameters)

    def close(self) -> None:
        """Stop the worker thread (after the batch in progress) and drop the pipeline."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._pipeline = None
        if self.device == "cuda":
            _free_accelerator_memory()

    async def aclose(self) -> None:
        """close(), off the event loop."""
        await asyncio.to_thread(self.close)


def _brief(error: BaseException) -> str:
    """The first line of an error, without tracebacks or paths beyond what it says."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__

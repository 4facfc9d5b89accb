"""The local diffusion pipeline: loading, family defaults and batched calls.

One copy of this code serves both places pixels are made: the in-process generator
(`generators/local.py`) and the GPU worker tier (`gpu_worker/`), so a request gives the same
pixels wherever it runs. torch and diffusers are imported only when a pipeline is loaded or
called, never when this module is imported.
"""

from __future__ import annotations

import gc
import inspect
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from config import BACKEND_DIR
from mv.character_reference import MAX_REFERENCE_IMAGES, image_size
from services.generation.base import (
    GenerationCanceledError,
    GenerationRequest,
    GeneratorFailedError,
    OutOfMemoryError,
    ReferenceImage,
)

DeviceSetting = Literal["auto", "cuda", "cpu"]
PipelineLoader = Callable[[str, str], Any]
# Called after each denoising step with (steps done, total steps); raising stops the call.
StepCallback = Callable[[int, int], None]


# The reference-image area the FLUX families condition on; a larger image is scaled down to it.
MAX_REFERENCE_PIXELS = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Per-family call defaults; None leaves the pipeline's own default."""

    family: str
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    size_scale: float = 1.0  # times the one-megapixel aspect-ratio table
    extra: dict[str, Any] = field(default_factory=dict)
    max_references: int = 0  # reference images one call can take (0: text-to-image only)
    # Keyword arguments only calls with references get.
    reference_extra: dict[str, Any] = field(default_factory=dict)
    area_keyword: str | None = None  # a pipeline argument that overrides width x height


def profile_for(pipeline: Any, model_id: str) -> ModelProfile:
    """The call defaults for the pipeline's model family."""
    kind = type(pipeline).__name__
    if kind == "Flux2KleinPipeline":
        # Step-distilled FLUX.2 [klein] (the model card): 4 steps, no guidance; text-to-image
        # and generation from reference images (`image=[...]`) in one pipeline.
        references = MAX_REFERENCE_IMAGES
        return ModelProfile("flux2-klein", 4, 1.0, max_references=references)
    if kind == "FluxKontextPipeline":
        # One reference. Kontext resizes the output to its own preferred area (max_area) and
        # bucket (_auto_resize) unless told not to; the size asked for is the size it gets.
        return ModelProfile(
            "flux-kontext",
            28,
            2.5,
            max_references=1,
            reference_extra={"_auto_resize": False},
            area_keyword="max_area",
        )
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


def _available_without_network(model_id: str) -> bool:
    """Whether `model_id` is a local directory or a hub id this machine has cached."""
    if Path(resolve_model_source(model_id)).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "model_index.json"), str)
    except ValueError:  # not even a valid hub id
        return False


def resolve_device(setting: DeviceSetting) -> str:
    """The torch device LOCAL_DEVICE asks for; GeneratorFailedError saying why when none fits."""
    import torch

    if setting == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        raise GeneratorFailedError("LOCAL_DEVICE=cuda but no CUDA device is available")
    raise GeneratorFailedError(
        "no CUDA device (LOCAL_DEVICE=auto); on this machine, `make run-tiny` runs a tiny model "
        "on the CPU, or set LOCAL_DEVICE=cpu with a LOCAL_MODEL_ID small enough for it"
    )


# Loading creates modules on the meta device by patching torch process-wide (accelerate's
# init_empty_weights), so two loads at once in one process corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()


def route_library_logs() -> None:
    """Send diffusers', transformers' and huggingface_hub's log lines (a download's retries
    among them) to the process's handler, not their own.

    Their own handlers print in their own format; this runs before the pipeline classes are
    imported, since importing them already logs. Progress bars are for terminals: off.
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.disable_progress_bar()
        library_logging.disable_default_handler()
        library_logging.enable_propagation()
    disable_progress_bars()
    hub_logger = hub_logging.get_logger()
    hub_logger.handlers = []  # the StreamHandler it adds on import
    hub_logging.enable_propagation()


def load_pipeline(model_id: str, device: str) -> Any:
    """Load `model_id` with AutoPipelineForText2Image: bf16 on CUDA, fp32 on the CPU."""
    route_library_logs()
    import torch
    from diffusers import AutoPipelineForText2Image

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with _LOAD_LOCK:
        pipeline = AutoPipelineForText2Image.from_pretrained(
            resolve_model_source(model_id), dtype=dtype
        )
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def decode_reference(reference: ReferenceImage) -> Image.Image:
    """A reference image's pixels, as RGB, for the pipeline."""
    with Image.open(io.BytesIO(reference.data)) as image:
        return image.convert("RGB")


def free_accelerator_memory() -> None:
    """Collect garbage and return cached CUDA memory to the device."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def brief(error: BaseException) -> str:
    """The first line of an error, without tracebacks or paths beyond what it says."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


@dataclass(frozen=True, slots=True)
class CallShape:
    """What requests must have in common to share one pipeline call."""

    width: int
    height: int
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: bool  # whether the call passes negative prompts
    references: tuple[str, ...]  # every image of one call starts from the same references


class DiffusionModel:
    """A loaded pipeline with its family defaults; runs batched calls on the caller's thread.

    One call takes the images of one or more requests of the same shape, with one CPU-seeded
    `torch.Generator` per image, so each seed gives the same image alone or in any batch
    (within one uint8 level: batched kernels may round differently).
    """

    def __init__(self, pipeline: Any, model_id: str, device: str) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        self.device = device
        self.profile = profile_for(pipeline, model_id)
        self._takes_negative_prompt = self._negative_prompt_applies()

    @classmethod
    def load(
        cls, model_id: str, device: DeviceSetting, loader: PipelineLoader = load_pipeline
    ) -> DiffusionModel:
        """Resolve the device and load `model_id`; GeneratorFailedError saying why it cannot."""
        resolved = resolve_device(device)
        try:
            return cls(loader(model_id, resolved), model_id, resolved)
        except Exception as error:
            free_accelerator_memory()
            if not _available_without_network(model_id):
                raise GeneratorFailedError(
                    f"LOCAL_MODEL_ID={model_id} is neither a model directory nor in this "
                    "machine's Hugging Face cache, and downloading it failed (no network, or "
                    "HF_HUB_OFFLINE=1): download it once with network, or set LOCAL_MODEL_ID to "
                    f"a model directory (make run-tiny builds a tiny one); {brief(error)}"
                ) from error
            raise GeneratorFailedError(
                f"the local model {model_id!r} failed to load: {brief(error)}"
            ) from error

    def _negative_prompt_applies(self) -> bool:
        if self.profile.family.startswith("flux"):
            return False  # guidance-distilled: FLUX has no negative branch at true_cfg 1
        accepts = "negative_prompt" in inspect.signature(self.pipeline.__call__).parameters
        guidance = self.profile.guidance_scale
        return accepts and (guidance is None or guidance > 1)

    def shape(self, request: GenerationRequest) -> CallShape:
        """The call shape `request` needs; requests of equal shape may share a call."""
        width, height = image_size(request.aspect_ratio, self.profile.size_scale)
        return CallShape(
            width,
            height,
            self.profile.num_inference_steps,
            self.profile.guidance_scale,
            self._takes_negative_prompt and bool(request.negative_prompt),
            request.reference_ids,
        )

    @property
    def max_references(self) -> int:
        """How many reference images one request may bring (0: text-to-image only)."""
        return self.profile.max_references

    def call_arguments(self, requests: Sequence[GenerationRequest]) -> dict[str, Any]:
        """The exact keyword arguments of one pipeline call for `requests` (of one shape)."""
        import torch

        shapes = {self.shape(request) for request in requests}
        if len(shapes) != 1:
            raise ValueError("requests of different shapes cannot share a pipeline call")
        shape = shapes.pop()
        arguments: dict[str, Any] = {
            "prompt": [prompt for r in requests for prompt in r.prompts],
            "width": shape.width,
            "height": shape.height,
            # CPU generators: the same seed gives the same starting noise on any device.
            "generator": [
                torch.Generator("cpu").manual_seed(seed) for r in requests for seed in r.seeds
            ],
            "output_type": "pil",
            **self.profile.extra,
        }
        if shape.num_inference_steps is not None:
            arguments["num_inference_steps"] = shape.num_inference_steps
        if shape.guidance_scale is not None:
            arguments["guidance_scale"] = shape.guidance_scale
        if self.profile.area_keyword is not None:
            arguments[self.profile.area_keyword] = shape.width * shape.height
        if shape.negative_prompt:
            arguments["negative_prompt"] = [r.negative_prompt for r in requests for _ in r.seeds]
        if shape.references:
            if len(shape.references) > self.max_references:
                raise GeneratorFailedError(
                    f"the local model {self.model_id!r} takes at most {self.max_references} "
                    f"reference image(s), not {len(shape.references)}"
                )
            images = [decode_reference(r) for r in requests[0].references]
            arguments["image"] = images[0] if self.max_references == 1 else images
            arguments.update(self.profile.reference_extra)
        return arguments

    def parameters(self, request: GenerationRequest, batch_images: int) -> dict[str, Any]:
        """How `request`'s images were made, as replies report it."""
        shape = self.shape(request)
        return {
            "family": self.profile.family,
            "device": self.device,
            "width": shape.width,
            "height": shape.height,
            "num_inference_steps": shape.num_inference_steps,
            "guidance_scale": shape.guidance_scale,
            "negative_prompt_applied": shape.negative_prompt,
            "reference_images": len(shape.references),
            "batch_images": batch_images,
        }

    def run(
        self, requests: Sequence[GenerationRequest], on_step: StepCallback | None = None
    ) -> list[tuple[Image.Image, ...]]:
        """One pipeline call for all images of `requests`; each request's images, in order.

        `on_step` may raise GenerationCanceledError to stop the call at that step. Running
        out of GPU memory frees what it can and raises OutOfMemoryError; any other pipeline
        failure is a GeneratorFailedError.
        """
        import torch

        arguments = self.call_arguments(requests)

        def on_step_end(pipeline: Any, step: int, _: Any, tensors: dict[str, Any]) -> Any:
            if on_step is not None:
                on_step(step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0))
            return tensors

        images = sum(r.num_images for r in requests)
        try:
            with torch.inference_mode():
                output = self.pipeline(**arguments, callback_on_step_end=on_step_end)
        except GenerationCanceledError:
            raise
        except torch.OutOfMemoryError:
            del arguments
            free_accelerator_memory()
            raise OutOfMemoryError(
                f"the GPU ran out of memory generating {images} image(s) at "
                f"{self.shape(requests[0]).width}x{self.shape(requests[0]).height}; "
                "try fewer images"
            ) from None
        except Exception as error:
            raise GeneratorFailedError(f"the local pipeline failed: {brief(error)}") from error
        pictures = list(output.images)
        per_request: list[tuple[Image.Image, ...]] = []
        for request in requests:
            per_request.append(tuple(pictures[: request.num_images]))
            del pictures[: request.num_images]
        return per_request

"""Image generation: the ImageGenerator interface, its two implementations and the policy.

`build_generation_policy(settings)` wires them as IMAGE_GENERATOR says:
- auto: the local pipeline (when CUDA is present, or LOCAL_DEVICE=cpu) first, Replicate when
  a token is set and the local one is unavailable or fails; the reason is reported.
- local / replicate: only that one.
"""

from __future__ import annotations

import httpx

from config import Settings
from mv.character_reference import GeneratorName
from services.generation.base import (
    GeneratedImage,
    GenerationBusyError,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorUnavailableError,
    ImageGenerator,
    OutOfMemoryError,
    ProviderError,
)
from services.generation.local_diffusers import DiffusersGenerator, PipelineLoader, load_pipeline
from services.generation.policy import GenerationPolicy, PolicyOutcome
from services.generation.replicate_api import ReplicateGenerator

__all__ = [
    "DiffusersGenerator",
    "GeneratedImage",
    "GenerationBusyError",
    "GenerationError",
    "GenerationPolicy",
    "GenerationRequest",
    "GenerationResult",
    "GenerationTimeoutError",
    "GeneratorFailedError",
    "GeneratorUnavailableError",
    "ImageGenerator",
    "OutOfMemoryError",
    "PolicyOutcome",
    "ProviderError",
    "ReplicateGenerator",
    "build_generation_policy",
]


def build_generation_policy(
    settings: Settings,
    *,
    local_loader: PipelineLoader = load_pipeline,
    replicate_transport: httpx.AsyncBaseTransport | None = None,
) -> GenerationPolicy:
    """The generators IMAGE_GENERATOR enables, behind the policy (nothing is loaded yet)."""
    generators: dict[GeneratorName, ImageGenerator] = {}
    if settings.image_generator in ("auto", "local"):
        generators["local"] = DiffusersGenerator(
            settings.local_model_id, settings.local_device, loader=local_loader
        )
    token = settings.replicate_api_token
    if settings.image_generator in ("auto", "replicate") and token is not None:
        generators["replicate"] = ReplicateGenerator(
            token.get_secret_value(),
            settings.replicate_model,
            max_attempts=settings.replicate_max_attempts,
            transport=replicate_transport,
        )
    return GenerationPolicy(
        settings.image_generator,
        generators,
        timeout_seconds=settings.generation_timeout_seconds,
    )

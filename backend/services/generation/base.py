"""The generator interface: frozen requests and results, and the errors generators raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from mv.character_reference import GeneratorName, OutputFormat


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: one prompt, one image per seed."""

    prompt: str
    seeds: tuple[int, ...]
    aspect_ratio: str
    negative_prompt: str | None = None
    output_format: OutputFormat = "png"

    @property
    def num_images(self) -> int:
        """How many images are asked for."""
        return len(self.seeds)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image as the generator made it: decoded pixels, or bytes already encoded."""

    seed: int
    pixels: Image.Image | None = None
    encoded: bytes | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """Images (in seed order) and how they were made."""

    images: tuple[GeneratedImage, ...]
    model: str
    backend: GeneratorName
    parameters: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ImageGenerator(Protocol):
    """Something that turns a GenerationRequest into images."""

    name: GeneratorName
    model: str

    def start(self) -> None:
        """Begin any slow preparation (model loading) without waiting for it."""

    async def unavailable_reason(self) -> str | None:
        """None when the generator can take requests, else why not (waits for a load)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """All images of `request`, or a GenerationError."""

    def describe(self) -> dict[str, Any]:
        """Non-secret state for /config/debug."""

    async def aclose(self) -> None:
        """Release threads, clients and memory."""


class GenerationError(Exception):
    """Base of every generation failure; the message is safe to show a client."""


class GeneratorUnavailableError(GenerationError):
    """No generator can take the request; the message says what to configure."""


class GeneratorFailedError(GenerationError):
    """The local pipeline failed (load error, runtime error); the auto policy may fall back."""


class OutOfMemoryError(GeneratorFailedError):
    """The GPU ran out of memory for this request; what could be freed was freed."""


class ProviderError(GenerationError):
    """A remote provider failed after retries, or sent something that is not a usable image."""


class GenerationBusyError(GenerationError):
    """The generation queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationTimeoutError(GenerationError):
    """The request did not finish within GENERATION_TIMEOUT_SECONDS."""

"""The generator interface: frozen requests and results, and the errors generators raise."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from mv.character_reference import GeneratorName, OutputFormat


@dataclass(frozen=True, slots=True)
class ReferenceImage:
    """A stored image a generation makes its character from: its id and its bytes (PNG or
    another checked format, already downscaled to what the model takes)."""

    id: str
    data: bytes = field(repr=False)
    url: str | None = None  # a presigned URL of the stored image, for providers that fetch


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: one image per seed, each with its prompt, all from the same
    reference images (none for text-to-image)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    aspect_ratio: str
    negative_prompt: str | None = None
    output_format: OutputFormat = "png"
    references: tuple[ReferenceImage, ...] = ()

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError("a generation request needs one prompt per seed")

    @classmethod
    def of_prompt(
        cls, prompt: str, seeds: tuple[int, ...], aspect_ratio: str, **options: Any
    ) -> GenerationRequest:
        """A request whose images all share `prompt`."""
        return cls((prompt,) * len(seeds), seeds, aspect_ratio, **options)

    @property
    def num_images(self) -> int:
        """How many images are asked for."""
        return len(self.seeds)

    @property
    def reference_ids(self) -> tuple[str, ...]:
        """The ids of the reference images, in order."""
        return tuple(reference.id for reference in self.references)


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


class GenerationProgress:
    """Progress of one running generation, and its cancel switch; safe to share with threads.

    The generator calls `advance` as work completes (diffusion steps, or finished images);
    once `cancel()` has been called, the next `advance` raises GenerationCanceledError, which
    is how a pipeline stops at its next step.
    """

    def __init__(self) -> None:
        self.step = 0
        self.total_steps = 0
        self._canceled = threading.Event()

    def advance(self, step: int, total_steps: int) -> None:
        """Record that `step` of `total_steps` is done; raise if the generation was canceled."""
        self.step, self.total_steps = step, total_steps
        self.raise_if_canceled()

    def raise_if_canceled(self) -> None:
        """Raise GenerationCanceledError once cancel() has been called."""
        if self._canceled.is_set():
            raise GenerationCanceledError("the generation was canceled")

    def cancel(self) -> None:
        """Ask the generation to stop at its next step."""
        self._canceled.set()

    @property
    def canceled(self) -> bool:
        """Whether cancel() was called."""
        return self._canceled.is_set()

    @property
    def fraction(self) -> float:
        """Share of the work done, 0..1."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@runtime_checkable
class ImageGenerator(Protocol):
    """Something that turns a GenerationRequest into images."""

    name: GeneratorName
    model: str

    def start(self) -> None:
        """Begin any slow preparation (model loading) without waiting for it."""

    async def unavailable_reason(self) -> str | None:
        """None when the generator can take requests, else why not (waits for a load)."""

    def known_unavailable_reason(self) -> str | None:
        """Why it cannot take requests, when that is already known (no waiting, no I/O);
        None when it can or may (a model still loading)."""

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """All images of `request`, or a GenerationError; reports to and obeys `progress`."""

    def max_references(self) -> int | None:
        """How many reference images one request may bring (0: text-to-image only); None
        while that is not known yet (a model still loading, a worker not yet asked)."""

    def describe(self) -> dict[str, Any]:
        """Non-secret state for /config/debug."""

    async def aclose(self) -> None:
        """Release threads, clients and memory."""


class GenerationError(Exception):
    """Base of every generation failure; the message is safe to show a client."""


class GeneratorUnavailableError(GenerationError):
    """No generator can take the request; the message says what to configure."""


class GeneratorNotOfferedError(GenerationError):
    """The request names a generator this server does not offer (disabled or unconfigured)."""


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


class GenerationCanceledError(GenerationError):
    """The generation was canceled before it finished."""


class ReferencesNotSupportedError(GenerationError):
    """The request has reference images and no generator that may run it can take them;
    the message names the setting to change."""


class GenerationTimeoutError(GenerationError):
    """The request did not finish within GENERATION_TIMEOUT_SECONDS."""

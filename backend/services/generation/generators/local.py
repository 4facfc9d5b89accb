"""DiffusersGenerator: the diffusion pipeline in this process, loaded once, owned by one thread."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from services.generation.base import (
    GeneratedImage,
    GenerationError,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GeneratorFailedError,
)
from services.generation.diffusion import (
    DeviceSetting,
    DiffusionModel,
    PipelineLoader,
    free_accelerator_memory,
    load_pipeline,
)

logger = logging.getLogger(__name__)


class DiffusersGenerator:
    """Runs every request on one worker thread that owns the pipeline.

    The model is loaded once, in the background, when `start()` is called; requests wait for
    that load. All images of a request go through one batched pipeline call (DiffusionModel).
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
        self._loader = loader
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="diffusers")
        self._load: Future[None] | None = None
        self._loaded: DiffusionModel | None = None
        self._unavailable: str | None = None
        self.load_seconds: float | None = None

    # ----------------------------------------------------------------- loading

    def start(self) -> None:
        """Begin loading the model on the worker thread (once)."""
        if self._load is None:
            self._load = self._worker.submit(self._load_on_worker)

    def _load_on_worker(self) -> None:
        started = time.perf_counter()
        try:
            loaded = DiffusionModel.load(self.model, self.device_setting, self._loader)
        except GenerationError as error:
            if error.__cause__ is not None:
                logger.error("loading %s failed", self.model, exc_info=error.__cause__)
            self._unavailable = str(error)
            return
        self._loaded = loaded
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s (%s) on %s in %.1f s",
            self.model,
            loaded.profile.family,
            loaded.device,
            self.load_seconds,
        )

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

    def known_unavailable_reason(self) -> str | None:
        """Why the model cannot run, once its load has failed; None while loading or loaded."""
        loaded = self._load is not None and self._load.done()
        return self._unavailable if loaded else None

    @property
    def state(self) -> str:
        """loading, ready or unavailable."""
        if self._load is None or not self._load.done():
            return "loading"
        return "unavailable" if self._unavailable else "ready"

    @property
    def device(self) -> str | None:
        """The device the model runs on, once loaded."""
        return self._loaded.device if self._loaded else None

    def max_references(self) -> int | None:
        """Reference images the loaded model takes; None until it is loaded."""
        return self._loaded.max_references if self._loaded else None

    def describe(self) -> dict[str, Any]:
        """Model, device, load state, family defaults and how many references it takes."""
        return {
            "model": self.model,
            "device_setting": self.device_setting,
            "device": self.device,
            "state": self.state,
            "unavailable_reason": self._unavailable,
            "family": self._loaded.profile.family if self._loaded else None,
            "max_references": self.max_references(),
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
        return self._loaded.pipeline if self._loaded else None

    def call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The exact keyword arguments the batched pipeline call gets for `request`."""
        assert self._loaded is not None
        return self._loaded.call_arguments([request])

    def _generate_on_worker(
        self, request: GenerationRequest, progress: GenerationProgress
    ) -> GenerationResult:
        assert self._loaded is not None
        progress.raise_if_canceled()  # canceled while waiting for the worker
        try:
            (pixels,) = self._loaded.run([request], progress.advance)
        except GeneratorFailedError as error:
            if error.__cause__ is not None:
                logger.error("local generation failed", exc_info=error.__cause__)
            raise
        images = tuple(
            GeneratedImage(seed=seed, pixels=image)
            for seed, image in zip(request.seeds, pixels, strict=True)
        )
        parameters = self._loaded.parameters(request, batch_images=request.num_images)
        return GenerationResult(images, self.model, "local", parameters)

    def close(self) -> None:
        """Stop the worker thread (after the batch in progress) and drop the pipeline."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        on_cuda = self.device == "cuda"
        self._loaded = None
        if on_cuda:
            free_accelerator_memory()

    async def aclose(self) -> None:
        """close(), off the event loop."""
        await asyncio.to_thread(self.close)

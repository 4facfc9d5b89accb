"""The generation policy: which generator runs a request, the fallback, and the deadline.

`build_generation_policy(settings)` wires the generators IMAGE_GENERATOR enables:
- auto: the worker tier when WORKER_URL is set, then the local pipeline (when CUDA is present,
  or LOCAL_DEVICE=cpu), then Replicate when a token is set; a generator that is unavailable or
  fails hands the request to the next one, and the reason is reported.
- worker / local / replicate: only that one.
A worker tier that sheds load is a 429, or, with OVERFLOW_TO_REPLICATE, a run on Replicate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from config import Settings
from mv.character_reference import GeneratorName
from services.generation.base import (
    GenerationBusyError,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorNotOfferedError,
    GeneratorUnavailableError,
    ImageGenerator,
    OutOfMemoryError,
    ReferencesNotSupportedError,
)
from services.generation.diffusion import PipelineLoader, load_pipeline
from services.generation.generators.local import DiffusersGenerator
from services.generation.generators.replicate import ReplicateGenerator
from services.generation.generators.worker import WorkerGenerator

PolicyMode = Literal["auto", "worker", "local", "replicate"]
AUTO_ORDER: tuple[GeneratorName, ...] = ("worker", "local", "replicate")

# After this many out-of-memory failures in a row, readiness reports the generator as degraded.
OUT_OF_MEMORY_WARNING_AFTER = 3

_HOW_TO_ENABLE = {
    "worker": "set WORKER_URL (and WORKER_TOKEN) to a worker tier started with make worker",
    "local": "run on a machine with CUDA; on a CPU, `make run-tiny` runs a tiny model, or set "
    "LOCAL_DEVICE=cpu with a LOCAL_MODEL_ID small enough for it",
    "replicate": "set REPLICATE_API_TOKEN",
}


_HOW_TO_TAKE_REFERENCES = {
    "worker": "start the worker tier with LOCAL_MODEL_ID=black-forest-labs/FLUX.2-klein-4B",
    "local": "set LOCAL_MODEL_ID=black-forest-labs/FLUX.2-klein-4B (a FLUX.1 Kontext model takes "
    "one reference)",
    "replicate": "set REPLICATE_REFERENCE_MODEL=black-forest-labs/flux-2-klein-4b",
}


def _reference_refusal(name: GeneratorName, generator: ImageGenerator, count: int) -> str | None:
    """Why `generator` cannot take `count` reference images, when that is known; else None."""
    limit = generator.max_references()
    if count == 0 or limit is None or limit >= count:
        return None
    takes = "no reference images" if limit == 0 else f"at most {limit} reference image(s)"
    return (
        f"{name}: the model {generator.model!r} takes {takes}, not {count}; to use references, "
        f"{_HOW_TO_TAKE_REFERENCES[name]}"
    )


def _not_configured(name: GeneratorName) -> str:
    return f"{name}: not configured ({_HOW_TO_ENABLE[name]})"


# A worker tier that cannot take requests is an outage worth a warning even while another
# generator serves; a local model that cannot run on this machine is its configuration.
_WARN_WHEN_SKIPPED: frozenset[GeneratorName] = frozenset({"worker"})


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """The result, and why the preferred generator was not the one used (if it was not)."""

    result: GenerationResult
    fallback_reason: str | None


@dataclass(slots=True)
class Readiness:
    """Why no generator can take a request (empty when one can), and what works but is not
    as configured."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class GenerationPolicy:
    """Owns the generator order (local first in `auto`), the fallback and the deadline.

    Admission (how many requests may wait) belongs to the generation queue in front of it.
    """

    def __init__(
        self,
        mode: PolicyMode,
        generators: dict[GeneratorName, ImageGenerator],
        *,
        timeout_seconds: float = 300.0,
        overflow_to_replicate: bool = False,
    ) -> None:
        self.mode = mode
        self.generators = generators
        self.timeout_seconds = timeout_seconds
        self.overflow_to_replicate = overflow_to_replicate
        # Consecutive out-of-memory failures per generator; a success resets the count.
        self._out_of_memory: dict[GeneratorName, int] = {}

    def start(self) -> None:
        """Start every generator's preparation (the local model load) in the background."""
        for generator in self.generators.values():
            generator.start()

    async def aclose(self) -> None:
        """Close every generator."""
        for generator in self.generators.values():
            await generator.aclose()

    def describe(self) -> dict[str, Any]:
        """Mode, limits and each configured generator's state, for /config/debug."""
        return {
            "mode": self.mode,
            "timeout_seconds": self.timeout_seconds,
            "overflow_to_replicate": self.overflow_to_replicate,
            "generators": {name: g.describe() for name, g in self.generators.items()},
        }

    def _order(self, requested: GeneratorName | None) -> list[GeneratorName]:
        if requested is not None:
            return [requested]
        if self.mode != "auto":
            return [self.mode]
        # The worker tier is part of `auto` only where WORKER_URL names one.
        return [name for name in AUTO_ORDER if name != "worker" or name in self.generators]

    async def readiness(self) -> Readiness:
        """Whether a generator can take a request now, and what needs an operator's eye.

        A local model still loading counts as a problem: the server is not ready until it is
        loaded, or until another generator can serve.
        """
        problems: list[str] = []
        outages: list[str] = []
        for name in self._order(None):
            generator = self.generators.get(name)
            if generator is None:
                problems.append(_not_configured(name))
                continue
            state = generator.describe().get("state")
            if state == "loading":
                problems.append(f"{name}: the model {generator.model!r} is still loading")
                continue
            reason = await generator.unavailable_reason()
            if reason is None:
                fallback = [f"{outage}; requests fall back to {name}" for outage in outages]
                return Readiness([], fallback + self._out_of_memory_warnings())
            problems.append(f"{name}: {reason}")
            if name in _WARN_WHEN_SKIPPED:
                outages.append(problems[-1])
        return Readiness(problems, self._out_of_memory_warnings())

    def refusal(self, requested: GeneratorName) -> str | None:
        """Why a request naming `requested` can never run on this server; None if it can."""
        if self.mode not in ("auto", requested):
            return (
                f"the {requested} generator is disabled (IMAGE_GENERATOR={self.mode}); "
                f"set IMAGE_GENERATOR=auto or {requested}"
            )
        if requested not in self.generators:
            return f"the {requested} generator is not configured ({_HOW_TO_ENABLE[requested]})"
        return None

    def check_offered(self, requested: GeneratorName | None) -> None:
        """Raise GeneratorNotOfferedError when a request names a generator that cannot run."""
        if requested is not None and (refusal := self.refusal(requested)) is not None:
            raise GeneratorNotOfferedError(refusal)

    def check_can_run(self, requested: GeneratorName | None) -> None:
        """Raise GeneratorUnavailableError at once when no generator can take a request and
        that is already known (none configured, each configured one failed to load), so that
        an asynchronous submit is refused up front as the synchronous route is; a generator
        still loading may yet succeed, so it is waited for as before."""
        self.check_offered(requested)
        reasons = []
        for name in self._order(requested):
            generator = self.generators.get(name)
            if generator is None:
                reasons.append(_not_configured(name))
                continue
            reason = generator.known_unavailable_reason()
            if reason is None:
                return
            reasons.append(f"{name}: {reason}")
        raise GeneratorUnavailableError("no image generator is available: " + "; ".join(reasons))

    def check_references(self, requested: GeneratorName | None, count: int) -> None:
        """Raise ReferencesNotSupportedError at once when every generator that could run a
        request with `count` reference images is known to take fewer (a generator still
        loading, or not yet asked, may yet take them, so it is waited for)."""
        if count == 0:
            return
        refusals = []
        for name in self._order(requested):
            generator = self.generators.get(name)
            if generator is None or generator.known_unavailable_reason() is not None:
                continue
            refusal = _reference_refusal(name, generator, count)
            if refusal is None:
                return
            refusals.append(refusal)
        if refusals:
            raise ReferencesNotSupportedError("; ".join(refusals))

    def reference_support(self) -> dict[str, int | None]:
        """How many reference images each configured generator takes (None: not known yet)."""
        return {name: generator.max_references() for name, generator in self.generators.items()}

    def _out_of_memory_warnings(self) -> list[str]:
        warnings = []
        for name, failures in self._out_of_memory.items():
            if failures >= OUT_OF_MEMORY_WARNING_AFTER:
                others = [other for other in self._order(None) if other != name]
                then = f"requests fall back to {others[0]}" if others else "requests fail"
                warnings.append(f"{name}: out of memory on the last {failures} generations; {then}")
        return warnings

    async def generate(
        self,
        request: GenerationRequest,
        *,
        backend: GeneratorName | None = None,
        progress: GenerationProgress | None = None,
    ) -> PolicyOutcome:
        """Generate with the first generator that can; raise a GenerationError otherwise."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await self._generate(request, backend, progress)
        except TimeoutError:
            raise GenerationTimeoutError(
                f"generation did not finish within {self.timeout_seconds:g} s"
            ) from None

    async def _generate(
        self,
        request: GenerationRequest,
        requested: GeneratorName | None,
        progress: GenerationProgress | None,
    ) -> PolicyOutcome:
        order = self._order(requested)
        if requested is not None and (refusal := self.refusal(requested)) is not None:
            raise GeneratorUnavailableError(refusal)
        reasons: list[str] = []
        reference_refusals: list[str] = []
        for index, name in enumerate(order):
            generator = self.generators.get(name)
            if generator is None:
                reasons.append(_not_configured(name))
                continue
            reason = await generator.unavailable_reason()
            if reason is not None:
                reasons.append(f"{name}: {reason}")
                continue
            refusal = _reference_refusal(name, generator, len(request.references))
            if refusal is not None:  # in auto, the next generator may take them
                reasons.append(refusal)
                reference_refusals.append(refusal)
                continue
            is_last = index == len(order) - 1
            try:
                result = await generator.generate(request, progress)
            except GenerationBusyError as error:
                if not self._overflows(name):
                    raise
                reasons.append(f"{name}: {error}; overflow to replicate")
                overflow = await self.generators["replicate"].generate(request, progress)
                return PolicyOutcome(overflow, "; ".join(reasons))
            except GeneratorFailedError as error:
                if isinstance(error, OutOfMemoryError):
                    self._out_of_memory[name] = self._out_of_memory.get(name, 0) + 1
                if is_last:
                    raise
                reasons.append(f"{name}: {error}")
                continue
            self._out_of_memory.pop(name, None)
            return PolicyOutcome(result, "; ".join(reasons) or None)
        if reference_refusals:
            raise ReferencesNotSupportedError("; ".join(reference_refusals))
        raise GeneratorUnavailableError("no image generator is available: " + "; ".join(reasons))

    def _overflows(self, name: GeneratorName) -> bool:
        """Whether a request `name` sheds goes to Replicate (OVERFLOW_TO_REPLICATE)."""
        return self.overflow_to_replicate and name != "replicate" and "replicate" in self.generators


def build_generation_policy(
    settings: Settings,
    *,
    local_loader: PipelineLoader = load_pipeline,
    replicate_transport: httpx.AsyncBaseTransport | None = None,
    worker_transport: httpx.AsyncBaseTransport | None = None,
) -> GenerationPolicy:
    """The generators IMAGE_GENERATOR enables, behind the policy (nothing is loaded yet)."""
    mode = settings.image_generator
    generators: dict[GeneratorName, ImageGenerator] = {}
    if mode in ("auto", "worker") and settings.worker_url is not None:
        token = settings.worker_token
        generators["worker"] = WorkerGenerator(
            settings.worker_url,
            token.get_secret_value() if token is not None else None,
            transport=worker_transport,
        )
    if mode in ("auto", "local"):
        generators["local"] = DiffusersGenerator(
            settings.local_model_id, settings.local_device, loader=local_loader
        )
    token = settings.replicate_api_token
    overflow = mode == "worker" and settings.overflow_to_replicate
    if (mode in ("auto", "replicate") or overflow) and token is not None:
        generators["replicate"] = ReplicateGenerator(
            token.get_secret_value(),
            settings.effective_replicate_model,
            reference_model=settings.replicate_reference_model,
            max_attempts=settings.replicate_max_attempts,
            transport=replicate_transport,
        )
    return GenerationPolicy(
        mode,
        generators,
        timeout_seconds=settings.generation_timeout_seconds,
        overflow_to_replicate=settings.overflow_to_replicate,
    )

"""The generation policy: which generator runs a request, the fallback, and the deadline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from mv.character_reference import GeneratorName
from services.generation.base import (
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorNotOfferedError,
    GeneratorUnavailableError,
    ImageGenerator,
    OutOfMemoryError,
)

PolicyMode = Literal["auto", "local", "replicate"]

# After this many out-of-memory failures in a row, readiness reports the generator as degraded.
OUT_OF_MEMORY_WARNING_AFTER = 3

_HOW_TO_ENABLE = {
    "local": "run on a machine with CUDA, or set LOCAL_DEVICE=cpu with a LOCAL_MODEL_ID "
    "small enough for the CPU",
    "replicate": "set REPLICATE_API_TOKEN",
}


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """The result, and why the preferred generator was not the one used (if it was not)."""

    result: GenerationResult
    fallback_reason: str | None


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
    ) -> None:
        self.mode = mode
        self.generators = generators
        self.timeout_seconds = timeout_seconds
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
            "generators": {name: g.describe() for name, g in self.generators.items()},
        }

    def _order(self, requested: GeneratorName | None) -> list[GeneratorName]:
        if requested is not None:
            return [requested]
        return ["local", "replicate"] if self.mode == "auto" else [self.mode]

    async def readiness_problems(self) -> list[str]:
        """Why no generator could take a request now; empty when one can.

        A local model still loading counts as a problem: the server is not ready until it is
        loaded, or until Replicate is configured as well.
        """
        problems: list[str] = []
        for name in self._order(None):
            generator = self.generators.get(name)
            if generator is None:
                problems.append(f"{name}: not configured ({_HOW_TO_ENABLE[name]})")
                continue
            state = generator.describe().get("state")
            if state == "loading":
                problems.append(f"{name}: the model {generator.model!r} is still loading")
                continue
            reason = await generator.unavailable_reason()
            if reason is None:
                return []
            problems.append(f"{name}: {reason}")
        return problems

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

    def readiness_warnings(self) -> list[str]:
        """What works but needs an operator's eye: a generator that keeps running out of memory."""
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
        for index, name in enumerate(order):
            generator = self.generators.get(name)
            if generator is None:
                reasons.append(f"{name}: not configured ({_HOW_TO_ENABLE[name]})")
                continue
            reason = await generator.unavailable_reason()
            if reason is not None:
                reasons.append(f"{name}: {reason}")
                continue
            is_last = index == len(order) - 1
            try:
                result = await generator.generate(request, progress)
            except GeneratorFailedError as error:
                if isinstance(error, OutOfMemoryError):
                    self._out_of_memory[name] = self._out_of_memory.get(name, 0) + 1
                if is_last:
                    raise
                reasons.append(f"{name}: {error}")
                continue
            self._out_of_memory.pop(name, None)
            return PolicyOutcome(result, "; ".join(reasons) or None)
        raise GeneratorUnavailableError("no image generator is available: " + "; ".join(reasons))

"""The generation policy: which generator runs a request, fallback, queue limit and deadline."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from mv.character_reference import GeneratorName
from services.generation.base import (
    GenerationBusyError,
    GenerationRequest,
    GenerationResult,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorUnavailableError,
    ImageGenerator,
)

PolicyMode = Literal["auto", "local", "replicate"]

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
    """Owns the generator order (local first in `auto`), the fallback, admission and deadline.

    Admission is a counter of requests running or waiting: past `queue_size` a request is
    refused at once with a Retry-After estimated from recent durations, instead of piling up
    behind a GPU that serves one batch at a time.
    """

    def __init__(
        self,
        mode: PolicyMode,
        generators: dict[GeneratorName, ImageGenerator],
        *,
        queue_size: int = 8,
        timeout_seconds: float = 300.0,
    ) -> None:
        self.mode = mode
        self.generators = generators
        self.queue_size = queue_size
        self.timeout_seconds = timeout_seconds
        self._admitted = 0
        self._recent_seconds = 10.0  # moving average of request durations

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
            "queue_size": self.queue_size,
            "in_flight": self._admitted,
            "timeout_seconds": self.timeout_seconds,
            "generators": {name: g.describe() for name, g in self.generators.items()},
        }

    def _order(self, requested: GeneratorName | None) -> list[GeneratorName]:
        if requested is not None:
            return [requested]
        return ["local", "replicate"] if self.mode == "auto" else [self.mode]

    def _retry_after(self) -> int:
        return max(1, min(300, math.ceil(self._recent_seconds * self._admitted / 2)))

    async def generate(
        self, request: GenerationRequest, *, backend: GeneratorName | None = None
    ) -> PolicyOutcome:
        """Generate with the first generator that can; raise a GenerationError otherwise."""
        if self._admitted >= self.queue_size:
            raise GenerationBusyError(
                f"the generation queue is full ({self.queue_size} requests)", self._retry_after()
            )
        self._admitted += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                outcome = await self._generate(request, backend)
        except TimeoutError:
            raise GenerationTimeoutError(
                f"generation did not finish within {self.timeout_seconds:g} s"
            ) from None
        finally:
            self._admitted -= 1
        elapsed = time.perf_counter() - started
        self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * elapsed
        return outcome

    async def _generate(
        self, request: GenerationRequest, requested: GeneratorName | None
    ) -> PolicyOutcome:
        order = self._order(requested)
        if requested is not None and self.mode not in ("auto", requested):
            raise GeneratorUnavailableError(
                f"the {requested} generator is disabled (IMAGE_GENERATOR={self.mode}); "
                f"set IMAGE_GENERATOR=auto or {requested}"
            )
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
                result = await generator.generate(request)
            except GeneratorFailedError as error:
                if is_last:
                    raise
                reasons.append(f"{name}: {error}")
                continue
            return PolicyOutcome(result, "; ".join(reasons) or None)
        raise GeneratorUnavailableError("no image generator is available: " + "; ".join(reasons))

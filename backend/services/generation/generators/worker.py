"""WorkerGenerator: pixels made by the GPU worker tier (a Ray Serve app), over its HTTP API.

This process imports neither Ray nor torch: it streams the worker's events (progress, the
encoded images) and hands the images to the caller to store. Canceling the awaiting task, or
the progress object, closes the stream, which cancels the request on the worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import httpx

from services.backoff import parse_retry_after
from services.generation.base import (
    GeneratedImage,
    GenerationBusyError,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GeneratorFailedError,
    OutOfMemoryError,
)
from services.generation.worker_protocol import (
    STREAM_MEDIA_TYPE,
    TOKEN_HEADER,
    Accepted,
    Done,
    EncodedImage,
    EventReader,
    Failed,
    Progress,
    WorkerGenerateRequest,
)

# How long a readiness check's answer is trusted before the next request checks again: a
# success for a while, a failure briefly (requests arriving together share one check).
READY_TTL_SECONDS = 5.0
PROBLEM_TTL_SECONDS = 1.0
DEFAULT_RETRY_AFTER_SECONDS = 2


class WorkerBusyError(GenerationBusyError):
    """The worker tier shed the request (Serve's queue is full)."""


class WorkerUnavailableError(GeneratorFailedError):
    """The worker tier cannot be reached, refuses the token, or has no model loaded."""


class WorkerGenerator:
    """A client of the worker tier at WORKER_URL; see the module docstring."""

    name: Literal["worker"] = "worker"

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 5.0,
        ready_timeout: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = "worker"  # the worker's model, once it has said which
        self._headers = {TOKEN_HEADER: token} if token else {}
        self._ready_timeout = ready_timeout
        # No read timeout: a generation may wait in the worker's queue; the policy's deadline
        # bounds the whole request.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(None, connect=connect_timeout),
            headers=self._headers,
        )
        self._ready_until = 0.0
        self._problem_until = 0.0
        self._last_problem: str | None = None
        self._probing = asyncio.Lock()
        self._info: dict[str, Any] = {}

    def start(self) -> None:
        """Nothing to prepare: readiness is checked on first use."""

    # ------------------------------------------------------------- readiness

    def _unreachable(self, error: Exception) -> str:
        return f"the worker tier at WORKER_URL={self.url} is unreachable ({type(error).__name__})"

    def _refused(self, status: int, detail: str = "") -> str:
        if status == 401:
            which = "is missing" if not self._headers else "is not the worker's token"
            return (
                f"the worker tier at WORKER_URL={self.url} refused the request: WORKER_TOKEN "
                f"{which}; set it to the token the worker was started with"
            )
        if status == 503:
            return f"the worker tier at WORKER_URL={self.url} is not ready: {detail or 'HTTP 503'}"
        return f"the worker tier at WORKER_URL={self.url} answered HTTP {status}"

    async def unavailable_reason(self) -> str | None:
        """None when the worker answered /ready recently; else why it cannot take requests."""
        async with self._probing:  # one check at a time; the others reuse its answer
            now = time.monotonic()
            if now < self._ready_until:
                return None
            if self._last_problem is not None and now < self._problem_until:
                return self._last_problem
            return await self._probe()

    def known_unavailable_reason(self) -> str | None:
        """The problem its last /ready check found, while that answer is fresh."""
        if self._last_problem is not None and time.monotonic() < self._problem_until:
            return self._last_problem
        return None

    async def _probe(self) -> str | None:
        try:
            reply = await self._client.get(self.url + "/ready", timeout=self._ready_timeout)
        except httpx.HTTPError as error:
            return self._problem(self._unreachable(error))
        if reply.status_code != 200:
            return self._problem(self._refused(reply.status_code, _detail(reply)))
        try:
            self._info = dict(reply.json())
        except ValueError:
            return self._problem(f"the worker tier at WORKER_URL={self.url} sent an invalid reply")
        self.model = str(self._info.get("model", self.model))
        self._last_problem = None
        self._ready_until = time.monotonic() + READY_TTL_SECONDS
        return None

    def _problem(self, problem: str) -> str:
        self._last_problem = problem
        self._ready_until = 0.0
        self._problem_until = time.monotonic() + PROBLEM_TTL_SECONDS
        return problem

    def max_references(self) -> int | None:
        """Reference images the worker's model takes, as its /ready said; None before."""
        limit = self._info.get("max_references")
        return limit if isinstance(limit, int) else None

    def describe(self) -> dict[str, Any]:
        """Where the worker is and what it last said (never the token)."""
        state = "ready" if time.monotonic() < self._ready_until else "unknown"
        if self._last_problem is not None:
            state = "unavailable"
        return {
            "url": self.url,
            "state": state,
            "model": self._info.get("model"),
            "device": self._info.get("device"),
            "max_batch_images": self._info.get("max_batch_images"),
            "max_references": self.max_references(),
            "unavailable_reason": self._last_problem,
        }

    # ------------------------------------------------------------- generation

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """Stream the request's events from the worker; its images and how they were made."""
        progress = progress or GenerationProgress()
        body = WorkerGenerateRequest.of(request).model_dump(mode="json")
        streaming = False
        try:
            async with self._client.stream("POST", self.url + "/generate", json=body) as reply:
                await self._check_status(reply)
                streaming = True
                return await self._read_events(reply, request, progress)
        except httpx.HTTPError as error:
            if streaming:
                raise WorkerUnavailableError(self._stopped()) from None
            raise WorkerUnavailableError(self._problem(self._unreachable(error))) from None

    def _stopped(self) -> str:
        self._ready_until = 0.0
        return (
            f"the worker tier at WORKER_URL={self.url} stopped before the generation finished "
            "(a worker replica failed); nothing was stored"
        )

    async def _check_status(self, reply: httpx.Response) -> None:
        if reply.status_code == 200:
            return
        await reply.aread()
        if reply.status_code == 429:
            retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            raise WorkerBusyError(
                f"the worker tier at WORKER_URL={self.url} is at capacity",
                max(1, round(retry_after or DEFAULT_RETRY_AFTER_SECONDS)),
            )
        problem = self._problem(self._refused(reply.status_code, _detail(reply)))
        raise WorkerUnavailableError(problem)

    async def _read_events(
        self, reply: httpx.Response, request: GenerationRequest, progress: GenerationProgress
    ) -> GenerationResult:
        if not reply.headers.get("content-type", "").startswith(STREAM_MEDIA_TYPE):
            raise WorkerUnavailableError(f"WORKER_URL={self.url} is not a worker tier")
        reader = EventReader()
        images: list[GeneratedImage] = []
        replica = None
        async for chunk in reply.aiter_bytes():
            try:
                events = reader.feed(chunk)
            except ValueError:  # pydantic's ValidationError too
                raise WorkerUnavailableError(
                    f"the worker tier at WORKER_URL={self.url} sent an unreadable event"
                ) from None
            for event in events:
                if isinstance(event, Accepted):
                    replica = event.replica
                elif isinstance(event, Progress):
                    progress.advance(event.step, event.total_steps)  # raises once canceled
                elif isinstance(event, EncodedImage):
                    images.append(GeneratedImage(seed=event.seed, encoded=event.data))
                elif isinstance(event, Failed):
                    raise self._failure(event)
                else:
                    return self._result(event, images, request, replica)
        raise WorkerUnavailableError(self._stopped())

    def _result(
        self,
        done: Done,
        images: list[GeneratedImage],
        request: GenerationRequest,
        replica: str | None,
    ) -> GenerationResult:
        if [image.seed for image in images] != list(request.seeds):
            raise WorkerUnavailableError(
                f"the worker tier at WORKER_URL={self.url} sent images for other seeds"
            )
        parameters = {**done.parameters, "worker_replica": replica}
        return GenerationResult(tuple(images), done.model, "worker", parameters)

    def _failure(self, event: Failed) -> GeneratorFailedError:
        message = f"the worker tier at WORKER_URL={self.url} failed: {event.message}"
        if event.error == "OutOfMemory":
            return OutOfMemoryError(message)
        return GeneratorFailedError(message)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _detail(reply: httpx.Response) -> str:
    """The message of a worker's JSON error reply, if it has one."""
    try:
        detail = reply.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    if isinstance(detail, dict):
        return str(detail.get("message", ""))[:300]
    return str(detail)[:300] if isinstance(detail, str) else ""

"""The worker app's two Serve deployments, behind Serve's HTTP proxy.

- WorkerIngress (CPU, any number): the internal HTTP API of `worker_protocol`: the token
  check, /health, /ready, and POST /generate, which relays a request's event stream and
  answers 429 with Retry-After when Serve sheds the request (`max_queued_requests`).
- DiffusionWorker (one per GPU): loads the pipeline once with the code the in-process
  generator runs (`services.generation.diffusion`), batches requests across callers with
  `@serve.batch` (counted in images, a request's images never split), runs requests of one
  call shape in one pipeline call, and encodes the images.

A caller that goes away cancels its request: Serve cancels the handle call, the request is
marked canceled, and the pipeline stops at its next step when no other request shares the
call (the others' images are still made; the canceled one's are discarded).
"""

# No `from __future__ import annotations` here: @serve.ingress hands the route methods to
# FastAPI outside this module, where string annotations would no longer resolve.
import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Receive, Scope, Send

from gpu_worker.logs import configure_replica_logging
from mv.character_reference import MAX_IMAGES_PER_REQUEST
from routers.errors.shape import error_response  # the API's one error shape
from services.asset_persistence import encode_image, identify_image
from services.generation.base import (
    GenerationCanceledError,
    GenerationError,
    GenerationRequest,
    OutOfMemoryError,
)
from services.generation.diffusion import (
    CallShape,
    DeviceSetting,
    DiffusionModel,
    PipelineLoader,
    brief,
    load_pipeline,
)
from services.generation.worker_protocol import (
    STREAM_MEDIA_TYPE,
    TOKEN_HEADER,
    Accepted,
    Done,
    EncodedImage,
    Failed,
    Progress,
    WorkerGenerateRequest,
    encode_event,
)

# A replica with a free place answers /ready's question at once; one with none would make it
# wait behind generations, so after this long the controller is asked instead.
INFO_TIMEOUT_SECONDS = 1.0
DEFAULT_RETRY_AFTER_SECONDS = 2.0
ENCODER_THREADS = 4
logger = logging.getLogger(__name__)

Event = Accepted | Progress | EncodedImage | Done | Failed
# What one step of a batch hands each caller: its new events, or the end of its stream.
Delivery = list[Event] | type[StopAsyncIteration]


@dataclass(eq=False)
class BatchJob:
    """One caller's request inside the replica, and whether that caller went away."""

    request: GenerationRequest
    shape: CallShape
    canceled: threading.Event = field(default_factory=threading.Event)


def images_in(jobs: Sequence[BatchJob]) -> int:
    """A batch's size for @serve.batch: the images it holds."""
    return sum(job.request.num_images for job in jobs)


class BatchConfig(BaseModel):
    """The replica's `user_config`: batching, changeable without a restart."""

    model_config = ConfigDict(extra="forbid")

    # At least one request's images: a request's images are never split.
    max_batch_images: int = Field(default=MAX_IMAGES_PER_REQUEST, ge=MAX_IMAGES_PER_REQUEST, le=64)
    batch_wait_seconds: float = Field(default=0.1, ge=0, le=10)


@serve.deployment(max_ongoing_requests=8, max_queued_requests=16)
class DiffusionWorker:
    """One pipeline per replica; see the module docstring."""

    def __init__(
        self, model_id: str, device: DeviceSetting, loader: PipelineLoader = load_pipeline
    ) -> None:
        configure_replica_logging()
        started = time.perf_counter()
        # Loading before the replica takes traffic: a replica answers only once it can serve.
        self.model = DiffusionModel.load(model_id, device, loader)
        logger.info(
            "loaded %s on %s in %.1f s",
            model_id,
            self.model.device,
            time.perf_counter() - started,
            extra={"model": model_id, "device": self.model.device},
        )
        if self.model.device == "cpu":
            # Ray caps a replica's threads at its logical CPUs; a model on the CPU gets the
            # node's cores, as the in-process generator does.
            torch.set_num_threads(os.cpu_count() or 1)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batch = BatchConfig()
        # Pipeline calls made, and those stopped early because every caller went away.
        self.calls = {"run": 0, "stopped": 0}
        # The pipeline belongs to one thread; encoding runs beside it, on others.
        self._pipeline_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._encoders = ThreadPoolExecutor(ENCODER_THREADS, thread_name_prefix="encode")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new batch size and wait (Serve calls this with the deployment's user_config)."""
        self.batch = BatchConfig.model_validate(user_config)
        self._generate_batch.set_max_batch_size(self.batch.max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(self.batch.batch_wait_seconds)

    def info(self) -> dict[str, Any]:
        """What this replica runs, for /ready."""
        return {
            "model": self.model.model_id,
            "family": self.model.profile.family,
            "max_references": self.model.max_references,
            "device": self.model.device,
            "replica": self.replica,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "pipeline_calls": dict(self.calls),
            **self.batch.model_dump(),
        }

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[Event]:
        """One caller's events: accepted, progress, then its images and done (or an error)."""
        request = WorkerGenerateRequest.model_validate(payload).generation_request()
        job = BatchJob(request, self.model.shape(request))
        yield Accepted(replica=self.replica)
        try:
            async for events in self._generate_batch(job):
                for event in events:
                    yield event
        finally:  # finished, failed, or the caller went away (Serve cancels this generator)
            job.canceled.set()

    # Two batches at a time: the next one's pipeline call queues behind the running one on the
    # pipeline thread, and runs while the first one's images are encoded.
    @serve.batch(
        max_batch_size=MAX_IMAGES_PER_REQUEST,
        batch_wait_timeout_s=0.1,
        max_concurrent_batches=2,
        batch_size_fn=images_in,
    )
    async def _generate_batch(self, jobs: list[BatchJob]) -> AsyncIterator[list[Delivery]]:
        """Run a batch: one pipeline call per call shape, in order of arrival."""
        for shape in dict.fromkeys(job.shape for job in jobs):
            group = [job for job in jobs if job.shape == shape and not job.canceled.is_set()]
            if group:
                async for deliveries in self._run_call(jobs, group):
                    yield deliveries

    async def _run_call(
        self, jobs: list[BatchJob], group: list[BatchJob]
    ) -> AsyncIterator[list[Delivery]]:
        """One pipeline call for `group`, relaying its steps; then each job's images."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[Progress] = asyncio.Queue()

        def on_step(step: int, total_steps: int) -> None:  # on the pipeline thread
            loop.call_soon_threadsafe(
                steps.put_nowait, Progress(step=step, total_steps=total_steps)
            )
            if all(job.canceled.is_set() for job in group):
                raise GenerationCanceledError("every request of this call was canceled")

        def to_group(events: list[Event]) -> list[Delivery]:
            return [list(events) if job in group else [] for job in jobs]

        requests = [job.request for job in group]
        self.calls["run"] += 1

        def run() -> list[Any]:  # on the pipeline thread, maybe after another batch's call
            if all(job.canceled.is_set() for job in group):
                raise GenerationCanceledError("every request of this call was canceled")
            return self.model.run(requests, on_step)

        call = loop.run_in_executor(self._pipeline_thread, run)
        while not call.done() or not steps.empty():
            next_step = asyncio.ensure_future(steps.get())
            await asyncio.wait({call, next_step}, return_when=asyncio.FIRST_COMPLETED)
            if next_step.done():
                yield to_group([next_step.result()])
            else:
                next_step.cancel()
        try:
            pixels = call.result()
        except GenerationCanceledError:
            self.calls["stopped"] += 1
            outcomes: list[list[Event]] = [[] for _ in group]
        except GenerationError as error:
            name = "OutOfMemory" if isinstance(error, OutOfMemoryError) else "GeneratorFailed"
            outcomes = [[Failed(error=name, message=str(error))] for _ in group]
        else:
            images = sum(request.num_images for request in requests)
            finishing = (
                self._finish(job, job_pixels, images)
                for job, job_pixels in zip(group, pixels, strict=True)
            )
            outcomes = list(await asyncio.gather(*finishing))
        by_job = dict(zip(group, outcomes, strict=True))
        yield [by_job.get(job, []) for job in jobs]
        yield [StopAsyncIteration if job in by_job else [] for job in jobs]

    async def _finish(self, job: BatchJob, pixels: Sequence[Any], batch_images: int) -> list[Event]:
        """A job's images, encoded in its format on the encoder threads, and its `done`."""
        if job.canceled.is_set():
            return []  # its caller went away: nothing to encode or send
        loop = asyncio.get_running_loop()
        output_format = job.request.output_format
        encoded = await asyncio.gather(
            *(
                loop.run_in_executor(self._encoders, encode_image, image, output_format)
                for image in pixels
            )
        )
        events: list[Event] = [
            EncodedImage(seed=seed, content_type=identify_image(data).content_type, data=data)
            for seed, data in zip(job.request.seeds, encoded, strict=True)
        ]
        parameters = self.model.parameters(job.request, batch_images)
        events.append(Done(model=self.model.model_id, parameters=parameters))
        return events


class RelayResponse(StreamingResponse):
    """The stream of a generation, which cancels the request behind it however it ends.

    Starlette stops reading the body when the client goes away, but does not close it: the
    request on the DiffusionWorker would run on unless it is canceled here.
    """

    def __init__(self, content: AsyncIterator[bytes], request: DeploymentResponseGenerator) -> None:
        super().__init__(content, media_type=STREAM_MEDIA_TYPE)
        self._request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the reply; then cancel the worker request (a no-op once it has finished)."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):  # it may have failed or finished already
                self._request.cancel()


api = FastAPI(title="GPU worker tier", description="Internal: generation for API replicas.")
TokenHeader = Annotated[str | None, Header(alias=TOKEN_HEADER)]


# An ingress replica only relays streams: it holds many at once, and sheds nothing itself.
@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class WorkerIngress:
    """The worker tier's HTTP API; see the module docstring."""

    def __init__(self, worker: DeploymentHandle, token: str) -> None:
        configure_replica_logging()
        self._worker = worker
        self._token = token.encode()
        self._recent_seconds: float | None = None
        self._info: dict[str, Any] = {}  # what a worker replica last said of itself

    def _refusal(self, token: str | None) -> JSONResponse | None:
        if token is not None and hmac.compare_digest(token.encode(), self._token):
            return None
        return error_response(401, "Unauthorized", f"a valid {TOKEN_HEADER} header is required")

    def _retry_after(self, configured: float | None) -> str:
        """The deployment's backpressure_config.retry_after_s when set; else about one
        generation's time, when a place in the queue is likely to free."""
        seconds = configured or self._recent_seconds or DEFAULT_RETRY_AFTER_SECONDS
        return str(max(1, math.ceil(seconds)))

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: this ingress replica answers (no token needed)."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self, token: TokenHeader = None) -> JSONResponse:
        """A DiffusionWorker replica with its model loaded answers: what it runs, and where.
        `busy` (still 200) when every replica is occupied: that is load, not an outage."""
        if (refusal := self._refusal(token)) is not None:
            return refusal
        response = None
        try:
            response = self._worker.info.remote()
            async with asyncio.timeout(INFO_TIMEOUT_SECONDS):
                self._info = await response
        except (TimeoutError, BackPressureError) as error:
            if isinstance(error, TimeoutError) and response is not None:
                response.cancel()  # (a shed request has nothing left to cancel)
            running = await asyncio.to_thread(self._running_worker_replicas)
            if running:
                return JSONResponse({**self._info, "status": "busy", "running_replicas": running})
            return error_response(
                503, "NotReady", "no worker replica is running (still loading the model?)"
            )
        except Exception as error:
            return error_response(503, "NotReady", f"no worker replica can serve: {brief(error)}")
        return JSONResponse({"status": "ready", **self._info})

    @staticmethod
    def _running_worker_replicas() -> int:
        """How many DiffusionWorker replicas of this app Serve runs (asks the controller)."""
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        deployment = app.deployments.get(DiffusionWorker.name) if app else None
        return deployment.replica_states.get("RUNNING", 0) if deployment else 0

    @api.post("/generate")
    async def generate(self, body: WorkerGenerateRequest, token: TokenHeader = None) -> Any:
        """Generate `body`: a stream of events, then the images (see worker_protocol)."""
        if (refusal := self._refusal(token)) is not None:
            return refusal
        stream: DeploymentResponseGenerator = self._worker.options(stream=True).generate.remote(
            body.model_dump()
        )
        try:
            first = await stream.__anext__()  # `accepted`, once a replica took the request
        except BackPressureError as error:
            return error_response(
                429,
                "WorkerBusy",
                "every worker replica is busy and the queue is full; retry later",
                **{"Retry-After": self._retry_after(error.retry_after_s)},
            )
        except Exception as error:
            return error_response(503, "WorkerUnavailable", f"no worker replica: {brief(error)}")
        return RelayResponse(self._relay(first, stream), stream)

    async def _relay(
        self, first: Event, stream: DeploymentResponseGenerator
    ) -> AsyncIterator[bytes]:
        started = time.monotonic()
        yield encode_event(first)
        try:
            async for event in stream:
                yield encode_event(event)
        except Exception as error:  # the replica died mid-generation
            yield encode_event(
                Failed(error="WorkerFailed", message=f"a worker replica failed: {brief(error)}")
            )
            return
        elapsed = time.monotonic() - started
        recent = self._recent_seconds
        self._recent_seconds = elapsed if recent is None else 0.7 * recent + 0.3 * elapsed

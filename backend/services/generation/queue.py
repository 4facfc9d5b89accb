"""The generation queue: one bounded queue in front of the generator, for sync and async requests.

- Admission: at most `max_queued` generations wait; one more is refused at once (429) with a
  Retry-After estimated from recent durations, without touching the generator.
- `workers` generations run at a time (one for a single GPU).
- Every state change is written to the generation's record; progress at most once per
  `watch_interval`, which is also how often cancel requests from other replicas are noticed.
- Cancel: a queued generation is dropped; a running one stops at its next step.
- Shedding: when the generator sheds a generation (the worker tier is at capacity), a caller
  who waits for it (the sync route) gets the 429 at once. An async generation waits instead,
  `queued` again, and is tried once more after a backoff of at least the tier's Retry-After,
  until `shedding_deadline_seconds` after it first started; then it fails with the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mv.character_reference import (
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
)
from mv.generation_jobs import (
    GenerationFailure,
    GenerationProgressInfo,
    GenerationState,
    WebhookDelivery,
)
from observability import bind, request_id_var
from services.asset_persistence import utc_now
from services.backoff import backoff_delay
from services.generation.base import (
    GenerationBusyError,
    GenerationCanceledError,
    GenerationProgress,
    GenerationTimeoutError,
)
from services.generation.records import (
    GENERATIONS_PREFIX,
    GenerationRecord,
    GenerationRecordStore,
    StoredGenerationFailedError,
    new_generation_id,
)
from services.metrics import Metrics
from services.storage import PreconditionFailedError
from services.webhooks import DeliveryOutcome, WebhookSender

logger = logging.getLogger(__name__)

# (the request, its progress, its owner) -> the reply
RunGeneration = Callable[
    [GenerateCharacterReferenceRequest, GenerationProgress, str | None],
    Awaitable[GenerateCharacterReferenceResponse],
]
ClassifyError = Callable[[BaseException], GenerationFailure]
# Backoff of an async generation the generator shed (never sooner than its Retry-After).
SHED_BACKOFF_BASE_SECONDS = 1.0
SHED_BACKOFF_CAP_SECONDS = 30.0
INTERRUPTED = GenerationFailure(
    error="Interrupted",
    message="the server stopped before this generation finished; submit it again",
    status_code=503,
)


def cancel_marker_key(generation_id: str) -> str:
    """Key whose presence asks the owning replica to cancel a generation."""
    return f"{GENERATIONS_PREFIX}/cancel/{generation_id}"


@dataclass(eq=False)
class LiveGeneration:
    """A generation this process owns, from submit until it finishes."""

    record: GenerationRecord
    progress: GenerationProgress = field(default_factory=GenerationProgress)
    done: asyncio.Future[GenerateCharacterReferenceResponse] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[GenerateCharacterReferenceResponse] | None = None
    saved_step: int = -1
    request_id: str | None = field(default_factory=request_id_var.get)
    # An async generation: shed by the generator, it waits and is tried again (see above).
    waits_out_shedding: bool = False
    ran_seconds: float | None = None  # how long the attempt that ran took (not the waits)

    @property
    def generation_id(self) -> str:
        """Its id."""
        return self.record.generation_id


class GenerationQueue:
    """Admits, runs, tracks and cancels generations; see the module docstring."""

    def __init__(
        self,
        run: RunGeneration,
        records: GenerationRecordStore,
        *,
        classify_error: ClassifyError,
        metrics: Metrics,
        webhooks: WebhookSender | None = None,
        max_queued: int = 8,
        workers: int = 1,
        watch_interval: float = 1.0,
        shedding_deadline_seconds: float = 300.0,
    ) -> None:
        self._run_generation = run
        self.records = records
        self.instance = records.instance
        self._classify = classify_error
        self.metrics = metrics
        self.webhooks = webhooks
        self.max_queued = max_queued
        self.workers = workers
        self.watch_interval = watch_interval
        self.shedding_deadline_seconds = shedding_deadline_seconds
        self._pending: asyncio.Queue[LiveGeneration] = asyncio.Queue()
        self._waiting: dict[str, LiveGeneration] = {}  # insertion order is queue order
        self._live: dict[str, LiveGeneration] = {}
        # Records whose last save failed (the store was unreachable): saved again by _watch.
        self._unsaved: dict[str, GenerationRecord] = {}
        self._running = 0
        self._recent_seconds: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        metrics.watch(metrics.queue_depth, lambda: len(self._waiting))
        metrics.watch(metrics.generations_running, lambda: self._running)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the workers, and (in the background) fail what a previous run of this
        instance left unfinished; start-up does not wait for the storage to answer."""
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._watch()))
        self._tasks.append(asyncio.create_task(self.fail_interrupted()))

    async def fail_interrupted(self) -> int:
        """Mark failed the records this instance left queued or running; how many there were."""
        try:
            records = await self.records.unfinished_of_this_instance()
        except Exception:
            logger.exception("could not look for interrupted generations")
            return 0
        interrupted = [record for record in records if record.generation_id not in self._live]
        for record in interrupted:
            logger.warning(
                "generation %s was left %s by a previous run; marking it failed",
                record.generation_id,
                record.status,
            )
            record.status, record.error, record.finished_at = "failed", INTERRUPTED, utc_now()
            await self._save_quietly(record)
        return len(interrupted)

    async def aclose(self) -> None:
        """Stop the workers; what has not finished is recorded as interrupted."""
        for task in self._tasks:
            task.cancel()
        for entry in list(self._live.values()):
            if entry.task is not None:
                entry.progress.cancel()
                entry.task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in list(self._live.values()):
            with contextlib.suppress(Exception):
                await self._finish(entry, "failed", error=INTERRUPTED)

    # ------------------------------------------------------------- admission

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to free: one generation's time."""
        recent = self._recent_seconds or 5.0
        return max(1, min(3600, math.ceil(recent / self.workers)))

    @property
    def depth(self) -> int:
        """How many generations wait."""
        return len(self._waiting)

    async def submit(
        self,
        request: GenerateCharacterReferenceRequest,
        *,
        webhook_url: str | None = None,
        owner: str | None = None,
        waits_out_shedding: bool = False,
    ) -> LiveGeneration:
        """Queue `owner`'s generation; GenerationBusyError (429) when the queue is full.

        With `waits_out_shedding` (async generations), a generator that sheds it does not fail
        it: it waits and runs again (see the module docstring)."""
        if len(self._waiting) >= self.max_queued:
            self.metrics.generations_rejected.inc()
            raise GenerationBusyError(
                f"the generation queue is full ({self.max_queued} waiting)", self.retry_after()
            )
        record = GenerationRecord(
            generation_id=new_generation_id(),
            status="queued",
            request=request,
            webhook_url=webhook_url,
            instance=self.instance,
            owner=owner,
        )
        entry = LiveGeneration(record, waits_out_shedding=waits_out_shedding)
        entry.done.add_done_callback(_consume_exception)
        self._waiting[entry.generation_id] = entry  # holds the place while the record is saved
        try:
            await self.records.save(record)
        except BaseException:
            del self._waiting[entry.generation_id]
            raise
        self._live[entry.generation_id] = entry
        self._pending.put_nowait(entry)
        return entry

    # -------------------------------------------------------------- running

    async def _work(self) -> None:
        while True:
            entry = await self._pending.get()
            if self._waiting.pop(entry.generation_id, None) is None:
                continue  # canceled while it waited
            self._running += 1
            try:
                await self._run(entry)
            except Exception:
                logger.exception("generation %s: recording its outcome failed", entry.generation_id)
            finally:
                self._running -= 1

    async def _run(self, entry: LiveGeneration) -> None:
        record = entry.record
        # The generation's log lines (and its task's) carry the ids of the work.
        bind(
            request_id=entry.request_id,
            generation_id=entry.generation_id,
            job_id=record.request.job_id,
        )
        record.status, record.started_at = "running", utc_now()
        started = time.perf_counter()
        # A cancel that came first is honoured at the generator's first step.
        entry.task = asyncio.create_task(self._generate(entry))
        await self._save_quietly(record)  # while the generation already runs
        await asyncio.wait({entry.task})
        task = entry.task
        if task.cancelled() or isinstance(task.exception(), GenerationCanceledError):
            await self._finish(entry, "canceled")
            return
        error = task.exception()
        if error is not None:
            await self._finish(entry, "failed", error=self._classify(error), exception=error)
            return
        response = task.result()
        # The generator's time, for the metric and Retry-After: waits for room are not it.
        elapsed = entry.ran_seconds or (time.perf_counter() - started)
        backend = response.metadata.backend
        self.metrics.generation_seconds.labels(backend).observe(elapsed)
        if response.metadata.fallback_reason:
            self.metrics.fallbacks.labels(backend).inc()
        self._recent_seconds = (
            elapsed if self._recent_seconds is None else 0.7 * self._recent_seconds + 0.3 * elapsed
        )
        logger.info("generation succeeded on %s in %.2f s", backend, elapsed)
        await self._finish(entry, "succeeded", response=response)

    async def _generate(self, entry: LiveGeneration) -> GenerateCharacterReferenceResponse:
        """Run the generation; an async one the generator sheds waits and runs again."""
        record = entry.record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shedding_deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            attempt_started = time.perf_counter()
            try:
                response = await self._run_generation(record.request, entry.progress, record.owner)
            except GenerationBusyError as shed:
                if not entry.waits_out_shedding:
                    raise
                delay = backoff_delay(
                    attempt,
                    base=SHED_BACKOFF_BASE_SECONDS,
                    cap=SHED_BACKOFF_CAP_SECONDS,
                    retry_after=shed.retry_after,
                )
                if loop.time() + delay > deadline:
                    raise GenerationTimeoutError(
                        f"the generation did not start within "
                        f"{self.shedding_deadline_seconds:g} s: {shed}"
                    ) from shed
                logger.info("shed by the generator (%s); trying again in %.1f s", shed, delay)
                record.status = "queued"
                await self._save_quietly(record)
                await asyncio.sleep(delay)  # a cancel ends the wait
                record.status = "running"
                await self._save_quietly(record)
            else:
                entry.ran_seconds = time.perf_counter() - attempt_started
                return response

    async def _finish(
        self,
        entry: LiveGeneration,
        status: GenerationState,
        *,
        response: GenerateCharacterReferenceResponse | None = None,
        error: GenerationFailure | None = None,
        exception: BaseException | None = None,
    ) -> None:
        record = entry.record
        record.status = status
        record.finished_at = utc_now()
        record.error = error
        record.progress = _progress_info(entry.progress) if record.started_at else None
        if response is not None:
            record.result = strip_base64(response)
        self._waiting.pop(entry.generation_id, None)
        self.metrics.generations.labels(status).inc()
        # Waiters (the sync route) get the outcome now; the record is saved meanwhile, and
        # the entry stays live until it is, so that a reader always finds it somewhere.
        if not entry.done.done():
            if response is not None:
                entry.done.set_result(response)
            elif status == "failed":
                entry.done.set_exception(
                    exception or StoredGenerationFailedError(error or INTERRUPTED)
                )
            else:
                entry.done.set_exception(GenerationCanceledError("the generation was canceled"))
        webhook_url, webhooks = record.webhook_url, self.webhooks
        if webhook_url and webhooks is not None:
            # Saved as pending with the final state, so a reader sees a webhook is on its way.
            record.webhook = WebhookDelivery(
                status="pending", delivery_id=str(uuid.uuid4()), attempts=0
            )
        if await self._save_quietly(record):
            self._live.pop(entry.generation_id, None)
        # else the entry stays live, answering for the record, until _watch saves it
        if webhook_url and webhooks is not None and record.webhook is not None:
            webhooks.send(
                webhook_url,
                f"generation.{status}",
                public_view(record),
                delivery_id=record.webhook.delivery_id,
                on_finished=functools.partial(self._record_webhook, record),
            )

    async def _record_webhook(self, record: GenerationRecord, outcome: DeliveryOutcome) -> None:
        """Store how the record's webhook delivery ended (in the live entry, if any, too)."""
        assert record.webhook is not None
        record.webhook = WebhookDelivery(
            status=outcome.status,
            delivery_id=record.webhook.delivery_id,
            attempts=outcome.attempts,
            last_error=outcome.last_error,
        )
        await self.records.record_webhook(record.generation_id, record.webhook)

    async def _save_quietly(self, record: GenerationRecord) -> bool:
        """Save; on failure log it and keep the record to save again (whether it was saved).

        A storage hiccup must not lose the generation itself, nor its final state.
        """
        try:
            await self.records.save(record)
        except Exception:
            logger.exception("saving generation %s failed; will retry", record.generation_id)
            self._unsaved[record.generation_id] = record
            return False
        self._unsaved.pop(record.generation_id, None)
        return True

    async def _save_unsaved(self) -> None:
        for generation_id, record in list(self._unsaved.items()):
            if await self._save_quietly(record) and record.finished:
                self._live.pop(generation_id, None)

    async def _watch(self) -> None:
        """Save progress of running generations and apply cancel requests from other replicas."""
        while True:
            await asyncio.sleep(self.watch_interval)
            await self._save_unsaved()
            for entry in list(self._live.values()):
                try:
                    await self._watch_one(entry)
                except Exception:
                    logger.exception("watching generation %s failed", entry.generation_id)

    async def _watch_one(self, entry: LiveGeneration) -> None:
        storage = self.records.storage
        if entry.record.finished:
            return  # finished, waiting only for its record to be saved
        marker = cancel_marker_key(entry.generation_id)
        if await asyncio.to_thread(storage.exists, marker):
            await asyncio.to_thread(storage.delete, marker)
            await self.cancel(entry.generation_id)
            return
        if entry.task is not None and entry.progress.step != entry.saved_step:
            entry.saved_step = entry.progress.step
            entry.record.progress = _progress_info(entry.progress)
            await self.records.save(entry.record)

    # -------------------------------------------------------------- queries

    def live(self, generation_id: str) -> LiveGeneration | None:
        """The generation if this process owns it and it has not finished."""
        return self._live.get(generation_id)

    def position(self, generation_id: str) -> int | None:
        """1-based place in the queue of a waiting generation; None otherwise."""
        for index, waiting_id in enumerate(self._waiting):
            if waiting_id == generation_id:
                return index + 1
        return None

    async def record(self, generation_id: str) -> GenerationRecord | None:
        """The current record: live (with fresh progress) when this process owns it."""
        entry = self._live.get(generation_id)
        if entry is None:
            return await self.records.load(generation_id)
        if entry.record.status == "running":
            entry.record.progress = _progress_info(entry.progress)
        return entry.record.model_copy(deep=True)

    async def cancel(self, generation_id: str) -> GenerationRecord | None:
        """Cancel a generation; the record afterwards (None when there is no such generation).

        A generation another replica owns gets a cancel request that replica applies within
        `watch_interval`; its record is returned as it stands.
        """
        entry = self._live.get(generation_id)
        if entry is None:
            record = await self.records.load(generation_id)
            if record is not None and not record.finished:
                with contextlib.suppress(PreconditionFailedError):  # asked for already
                    await asyncio.to_thread(
                        self.records.storage.put_if_absent,
                        cancel_marker_key(generation_id),
                        b"",
                        "application/octet-stream",
                    )
            return record
        entry.progress.cancel()
        if entry.generation_id in self._waiting:  # still waiting: drop it
            await self._finish(entry, "canceled")
        else:  # running (or about to): it stops at its next step
            if entry.task is not None:
                entry.task.cancel()
            await asyncio.wait({entry.done}, timeout=self.watch_interval * 10)
        return entry.record.model_copy(deep=True)


def _consume_exception(future: asyncio.Future[object]) -> None:
    # Nobody may await a generation's outcome (an async request); do not warn about it.
    if not future.cancelled():
        future.exception()


def _progress_info(progress: GenerationProgress) -> GenerationProgressInfo:
    return GenerationProgressInfo(
        step=progress.step, total_steps=progress.total_steps, fraction=progress.fraction
    )


def strip_base64(
    response: GenerateCharacterReferenceResponse,
) -> GenerateCharacterReferenceResponse:
    """The reply without the base64 image data (stored images are fetched by URL)."""
    images = [image.model_copy(update={"base64": None}) for image in response.images]
    return response.model_copy(update={"images": images})


def public_view(record: GenerationRecord) -> dict[str, object]:
    """A record as webhook payloads carry it: no request, owner or webhook URL."""
    return record.model_dump(mode="json", exclude={"instance", "webhook_url", "request", "webhook"})

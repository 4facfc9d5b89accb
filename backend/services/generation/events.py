"""A generation's progress as a stream of events: `queued`, `progress`, then `succeeded`,
`failed` or `canceled` (carrying the status route's body), after which the stream ends.

Any replica serves a stream: the replica running the generation reads its live state every
`live_poll` seconds (memory only), any other reads the shared record every `shared_poll`
seconds. Each event has an id that orders it (`q.3` queued third, `p.12` at step 12, `f`
final), so a client resuming with `Last-Event-ID` gets only what is newer. A comment every
`heartbeat` seconds of silence keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mv.generation_jobs import GenerationStatus, ProgressEvent, QueuedEvent
from mv.principals import Principal
from services.generation.records import GenerationNotFoundError, GenerationRecord
from services.generation.service import GenerationService

FINAL = "f"
_NO_POSITION = 1_000_000  # a queued event without a position sorts before every position


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """One event: its name and id, and its data (None for a heartbeat comment)."""

    name: str
    id: str
    data: QueuedEvent | ProgressEvent | GenerationStatus | None


HEARTBEAT = GenerationEvent(name="heartbeat", id="", data=None)


def event_order(event_id: str | None) -> tuple[int, int] | None:
    """Where an event id stands in a stream (None: not one of ours, start afresh)."""
    if event_id is None:
        return None
    kind, _, number = event_id.partition(".")
    if kind == FINAL and not number:
        return (2, 0)
    if kind in ("q", "p") and number.isdigit() and len(number) <= 9:
        return (0, -int(number)) if kind == "q" else (1, int(number))
    return None


class GenerationEvents:
    """Streams the events of generations that `GenerationService` knows."""

    def __init__(
        self,
        generations: GenerationService,
        *,
        live_poll: float = 0.05,
        shared_poll: float = 0.5,
        heartbeat: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.generations = generations
        self.queue = generations.queue
        self.live_poll = live_poll
        self.shared_poll = shared_poll
        self.heartbeat = heartbeat
        self._clock = clock

    async def stream(
        self, generation_id: str, viewer: Principal, last_event_id: str | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Events from the generation's current state on, newer than `last_event_id`;
        GenerationNotFoundError (on the first step) when `viewer` may not see it."""
        sent = event_order(last_event_id)
        quiet_since = self._clock()
        while True:
            record = await self.queue.record(generation_id)
            if record is None or not viewer.may_see(record.owner):
                raise GenerationNotFoundError(f"generation {generation_id} not found")
            event_id = self._event_id(record)
            order = event_order(event_id)
            if sent is None or (order is not None and order > sent):
                sent = order
                quiet_since = self._clock()
                yield GenerationEvent(
                    name=record.status if record.finished else self._name(record),
                    id=event_id,
                    data=await self._data(record),
                )
            if record.finished:
                return
            if self._clock() - quiet_since >= self.heartbeat:
                quiet_since = self._clock()
                yield HEARTBEAT
            live = self.queue.live(generation_id) is not None
            await asyncio.sleep(self.live_poll if live else self.shared_poll)

    def _event_id(self, record: GenerationRecord) -> str:
        if record.finished:
            return FINAL
        if record.status == "queued":
            position = self.queue.position(record.generation_id)
            return f"q.{_NO_POSITION if position is None else position}"
        return f"p.{record.progress.step if record.progress else 0}"

    @staticmethod
    def _name(record: GenerationRecord) -> str:
        return "queued" if record.status == "queued" else "progress"

    async def _data(
        self, record: GenerationRecord
    ) -> QueuedEvent | ProgressEvent | GenerationStatus:
        if record.finished:
            return await self.generations.present(record)
        if record.status == "queued":
            return QueuedEvent(
                generation_id=record.generation_id,
                status="queued",
                queue_position=self.queue.position(record.generation_id),
            )
        progress = record.progress
        return ProgressEvent(
            generation_id=record.generation_id,
            status="running",
            step=progress.step if progress else 0,
            total_steps=progress.total_steps if progress else 0,
            fraction=progress.fraction if progress else 0.0,
        )

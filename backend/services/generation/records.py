"""Generation records: the state of each queued generation, kept in the storage backend.

Any API replica can answer a status request from the record. Each replica also keeps an
empty marker per unfinished generation under `generations/active/{instance}/`, so that after
a crash it finds, without listing every record, the ones it left unfinished.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

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
from services.asset_persistence import utc_now
from services.generation.base import GenerationError
from services.owner_index import IndexPage, OwnerIndex
from services.storage import (
    ObjectNotFoundError,
    StorageBackend,
    read_latest,
    update_object,
)

GENERATIONS_PREFIX = "generations"
GENERATION_INDEX_ROOT = f"{GENERATIONS_PREFIX}/index"
ALL_GENERATIONS = "all"
FINISHED_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class StoredGenerationFailedError(GenerationError):
    """A generation that failed earlier (a replay, or one interrupted by a restart)."""

    def __init__(self, failure: GenerationFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class GenerationNotFoundError(GenerationError):
    """No generation has this id."""


class GenerationRecord(BaseModel):
    """One generation, from queued to finished, as stored."""

    model_config = ConfigDict(extra="forbid")

    generation_id: str
    status: GenerationState
    request: GenerateCharacterReferenceRequest
    webhook_url: str | None = None
    instance: str
    created_at: datetime = Field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: GenerationProgressInfo | None = None
    # The sync route's reply, stored without base64 (the images themselves are stored).
    result: GenerateCharacterReferenceResponse | None = None
    error: GenerationFailure | None = None
    webhook: WebhookDelivery | None = None
    # Who asked for it: its status, cancel and images are theirs (None: no authentication,
    # or stored before owners existed).
    owner: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the generation reached a final state."""
        return self.status in FINISHED_STATES


def new_generation_id() -> str:
    """A fresh generation id (a UUID)."""
    return str(uuid.uuid4())


def generation_key(generation_id: str) -> str:
    """Key of a generation's record."""
    return f"{GENERATIONS_PREFIX}/{uuid.UUID(generation_id)}.json"


def active_prefix(instance: str) -> str:
    """Prefix of the markers of one instance's unfinished generations."""
    return f"{GENERATIONS_PREFIX}/active/{instance}/"


class GenerationRecordStore:
    """Reads and writes generation records; every method runs storage I/O off the event loop."""

    def __init__(self, storage: StorageBackend, instance: str) -> None:
        self.storage = storage
        self.instance = instance
        self.index = OwnerIndex(storage, GENERATION_INDEX_ROOT)

    async def save(self, record: GenerationRecord) -> bool:
        """Write the record, and add or remove this instance's marker for it.

        The write is a compare-and-swap against the stored record, and a finished record is
        final: a late save (a "running" or progress update that lost a race with the finish,
        or a second finish) leaves it as it is; then False is returned.

        A new record's marker is written first (a marker without its record is cleaned up
        by the sweep), and a finished record is written before its marker goes: a crash in
        between never leaves an unfinished record without a marker.
        """
        data = record.model_dump_json(indent=2).encode()

        def change(stored: bytes | None) -> bytes | None:
            if stored is not None and GenerationRecord.model_validate_json(stored).finished:
                return None
            return data

        key = generation_key(record.generation_id)
        marker = active_prefix(record.instance) + record.generation_id
        if record.status == "queued" and record.started_at is None:  # new: create, no read
            await asyncio.to_thread(self.storage.put_bytes, marker, b"", "application/octet-stream")
            await asyncio.to_thread(self.storage.put_if_absent, key, data, "application/json")
            # Listed once the record exists: a failed save leaves no entry naming nothing.
            await asyncio.to_thread(
                self.index.add,
                record.owner,
                [ALL_GENERATIONS],
                record.created_at,
                record.generation_id,
            )
            return True
        updated = await asyncio.to_thread(update_object, self.storage, key, change)
        if record.finished:
            await asyncio.to_thread(self.storage.delete, marker)
        return updated.changed

    async def record_webhook(self, generation_id: str, webhook: WebhookDelivery) -> bool:
        """Set what happened to the record's webhook: the one change a finished record takes
        (a compare-and-swap, like every save); False when there is no such record."""

        def change(stored: bytes | None) -> bytes | None:
            if stored is None:
                return None
            record = GenerationRecord.model_validate_json(stored)
            record.webhook = webhook
            return record.model_dump_json(indent=2).encode()

        key = generation_key(generation_id)
        updated = await asyncio.to_thread(update_object, self.storage, key, change)
        return updated.changed

    async def load(self, generation_id: str) -> GenerationRecord | None:
        """The stored record as the arbitrating tier holds it, or None."""
        try:
            raw = await asyncio.to_thread(read_latest, self.storage, generation_key(generation_id))
        except ObjectNotFoundError:
            return None
        return GenerationRecord.model_validate_json(raw)

    async def page(self, owner: str | None, limit: int, cursor: str | None) -> IndexPage:
        """One page of `owner`'s generation ids, newest first."""
        return await asyncio.to_thread(self.index.page, owner, ALL_GENERATIONS, limit, cursor)

    async def unfinished_of_this_instance(self) -> list[GenerationRecord]:
        """Records this instance left queued or running (after a crash, say)."""
        prefix = active_prefix(self.instance)
        keys = await asyncio.to_thread(self.storage.list_keys, prefix)
        records = []
        for key in keys:
            generation_id = key.removeprefix(prefix)
            record = await self.load(generation_id) if _is_uuid(generation_id) else None
            if record is not None and not record.finished:
                records.append(record)
            else:  # a marker whose record finished or never was written
                await asyncio.to_thread(self.storage.delete, key)
        return records


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True

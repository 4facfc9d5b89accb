"""Generations as the API offers them: run now (sync) or queued (async), idempotent, cancelable."""

from __future__ import annotations

import asyncio
import base64
import functools

from mv.character_reference import (
    CharacterReferenceImage,
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
)
from mv.generation_jobs import (
    AsyncGenerateCharacterReferenceRequest,
    GenerationState,
    GenerationStatus,
)
from mv.lists import GenerationListItem, GenerationPage
from mv.principals import EVERYONE, Principal
from services.asset_persistence import API_PREFIX, AssetPersistenceService
from services.generation.base import (
    GenerationCanceledError,
    GenerationError,
    GenerationTimeoutError,
)
from services.generation.queue import GenerationQueue, LiveGeneration
from services.generation.records import (
    GenerationNotFoundError,
    GenerationRecord,
    StoredGenerationFailedError,
)
from services.idempotency import IdempotencyStore
from services.jobs import JobService
from services.webhooks import WebhookSender

SYNC_SCOPE = "generate_character_reference"
ASYNC_SCOPE = "character_reference_jobs"
REPLAY_POLL_SECONDS = 0.5


class GenerationFinishedError(GenerationError):
    """The generation already succeeded or failed; there is nothing left to cancel."""


class WebhooksDisabledError(GenerationError):
    """A webhook was asked for, but the server has no WEBHOOK_SECRET to sign it with."""


class GenerationService:
    """Submits generations to the queue and presents their records to clients."""

    def __init__(
        self,
        queue: GenerationQueue,
        assets: AssetPersistenceService,
        idempotency: IdempotencyStore,
        jobs: JobService,
        *,
        webhooks: WebhookSender | None = None,
        public_base_url: str | None = None,
        replay_timeout_seconds: float = 300.0,
    ) -> None:
        self.queue = queue
        self.webhooks = webhooks
        self.replay_timeout_seconds = replay_timeout_seconds
        self.assets = assets
        self.idempotency = idempotency
        self.jobs = jobs
        self._status_base = (public_base_url or "") + API_PREFIX + "/character_reference_jobs/"

    def status_url(self, generation_id: str) -> str:
        """Where the generation's status is polled."""
        return self._status_base + generation_id

    def events_url(self, generation_id: str) -> str:
        """Where the generation's events stream (signed when the API needs keys)."""
        path = f"{API_PREFIX}/character_reference_jobs/{generation_id}/events"
        return self.assets.urls.local.for_path(path)

    # --------------------------------------------------------------- submit

    async def _submit_once(
        self,
        scope: str,
        idempotency_key: str | None,
        body: GenerateCharacterReferenceRequest,
        webhook_url: str | None,
        fingerprinted: object,
        principal: Principal,
        *,
        waits_out_shedding: bool,
    ) -> str:
        """Queue the generation, or find the one an earlier request with this key (and this
        owner) queued. `waits_out_shedding`: async, it waits while the generator sheds it."""
        if body.job_id is not None:  # before anything is queued or stored
            await self.jobs.check_visible(body.job_id, principal)
        if body.reference_image_ids:  # likewise; read again when the generation starts
            await self.assets.check_character_references_exist(body.reference_image_ids, principal)
        submit = functools.partial(
            self.queue.submit,
            body,
            webhook_url=webhook_url,
            owner=principal.owner,
            waits_out_shedding=waits_out_shedding,
        )
        if idempotency_key is None:
            return (await submit()).generation_id
        reservation = self.idempotency.reserve(
            scope, idempotency_key, fingerprinted, principal.owner
        )
        async with reservation as slot:
            if slot.existing is not None:
                return slot.existing
            entry = await submit()
            slot.record(entry.generation_id)
            return entry.generation_id

    async def generate_now(
        self,
        body: GenerateCharacterReferenceRequest,
        idempotency_key: str | None = None,
        principal: Principal = EVERYONE,
    ) -> tuple[str, GenerateCharacterReferenceResponse]:
        """Queue `principal`'s generation and wait for it (the sync route): its id and its
        reply."""
        generation_id = await self._submit_once(
            SYNC_SCOPE,
            idempotency_key,
            body,
            None,
            body.model_dump(mode="json"),
            principal,
            waits_out_shedding=False,  # its caller waits: a shed generation is a 429 at once
        )
        return generation_id, await self.result(generation_id)

    async def submit(
        self,
        body: AsyncGenerateCharacterReferenceRequest,
        idempotency_key: str | None = None,
        principal: Principal = EVERYONE,
    ) -> GenerationStatus:
        """Queue `principal`'s generation and return its status at once (the async route).

        A webhook URL is checked first (WebhooksDisabledError, WebhookRefusedError): a
        destination that would be refused later is refused now, before any work.
        """
        if body.webhook_url is not None:
            if self.webhooks is None:
                raise WebhooksDisabledError(
                    "webhooks are disabled on this server: set WEBHOOK_SECRET to enable them"
                )
            await self.webhooks.check(body.webhook_url)
        generation_id = await self._submit_once(
            ASYNC_SCOPE,
            idempotency_key,
            body.generation_request(),
            body.webhook_url,
            body.model_dump(mode="json"),
            principal,
            waits_out_shedding=True,
        )
        return await self.status(generation_id)

    # ---------------------------------------------------------------- read

    async def _record(self, generation_id: str, viewer: Principal = EVERYONE) -> GenerationRecord:
        """The record; GenerationNotFoundError if there is none, or it is another owner's."""
        record = await self.queue.record(generation_id)
        if record is None or not viewer.may_see(record.owner):
            raise GenerationNotFoundError(f"generation {generation_id} not found")
        return record

    async def check_visible(self, generation_id: str, viewer: Principal = EVERYONE) -> None:
        """GenerationNotFoundError unless the generation exists and `viewer` may see it."""
        await self._record(generation_id, viewer)

    async def status(self, generation_id: str, viewer: Principal = EVERYONE) -> GenerationStatus:
        """The generation's state, queue position, progress, and reply or error."""
        return await self.present(await self._record(generation_id, viewer))

    async def present(self, record: GenerationRecord) -> GenerationStatus:
        """A record as clients see it, with a complete reply once it succeeded."""
        result = None
        if record.result is not None:
            result = await self.full_reply(record.result, record.request.include_base64)
        return GenerationStatus(
            generation_id=record.generation_id,
            status=record.status,
            status_url=self.status_url(record.generation_id),
            events_url=self.events_url(record.generation_id),
            queue_position=self.queue.position(record.generation_id),
            progress=record.progress,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            result=result,
            error=record.error,
            webhook=record.webhook,
        )

    async def full_reply(
        self, stored: GenerateCharacterReferenceResponse, include_base64: bool
    ) -> GenerateCharacterReferenceResponse:
        """A stored reply with fresh URLs, and the base64 data read back when it was asked for."""
        images = await asyncio.gather(
            *(self._refresh(image, include_base64) for image in stored.images)
        )
        return stored.model_copy(update={"images": list(images)})

    async def _refresh(
        self, image: CharacterReferenceImage, include_base64: bool
    ) -> CharacterReferenceImage:
        def read() -> tuple[str, str | None, str | None]:
            url = self.assets.urls.for_key(image.path)
            cloud_url = url if self.assets.urls.is_presigned(image.path) else None
            data = self.assets.storage.get_bytes(image.path) if include_base64 else None
            encoded = base64.b64encode(data).decode("ascii") if data is not None else None
            return url, cloud_url, encoded

        url, cloud_url, encoded = await asyncio.to_thread(read)
        return image.model_copy(update={"url": url, "cloud_url": cloud_url, "base64": encoded})

    async def result(self, generation_id: str) -> GenerateCharacterReferenceResponse:
        """The sync route's reply of a generation, waiting for it to finish; raises its error.

        A generation another replica runs is polled from its record, for at most
        `replay_timeout_seconds` (that replica may have died without a restart).
        """
        deadline = asyncio.get_running_loop().time() + self.replay_timeout_seconds
        while True:
            entry: LiveGeneration | None = self.queue.live(generation_id)
            if entry is not None:
                # Shielded: a client that goes away must not cancel the generation itself.
                return await asyncio.shield(entry.done)
            record = await self._record(generation_id)
            if record.status == "succeeded":
                assert record.result is not None
                return await self.full_reply(record.result, record.request.include_base64)
            if record.status == "failed":
                assert record.error is not None
                raise StoredGenerationFailedError(record.error)
            if record.status == "canceled":
                raise GenerationCanceledError("the generation was canceled")
            if asyncio.get_running_loop().time() > deadline:
                raise GenerationTimeoutError(
                    f"generation {generation_id} is still {record.status} on another replica"
                )
            await asyncio.sleep(REPLAY_POLL_SECONDS)  # running on another replica

    async def list_generations(
        self,
        owner: str | None,
        limit: int,
        cursor: str | None = None,
        status: GenerationState | None = None,
    ) -> GenerationPage:
        """One page of `owner`'s generations, newest first: a listing and one record read per
        entry. With `status`, the page holds those of its entries in that state (maybe none);
        InvalidCursorError for a cursor that is not this list's."""
        page = await self.queue.records.page(owner, limit, cursor)
        records = await asyncio.gather(*map(self.queue.record, page.item_ids))
        items = [
            GenerationListItem(
                generation_id=record.generation_id,
                status=record.status,
                created_at=record.created_at,
                finished_at=record.finished_at,
                status_url=self.status_url(record.generation_id),
            )
            for record in records
            if record is not None and (status is None or record.status == status)
        ]
        return GenerationPage(items=items, next_cursor=page.next_cursor)

    # -------------------------------------------------------------- cancel

    async def cancel(self, generation_id: str, viewer: Principal = EVERYONE) -> GenerationStatus:
        """Cancel a queued or running generation `viewer` may see; a finished one is an
        error (GenerationFinishedError)."""
        record = await self._record(generation_id, viewer)
        if record.status in ("succeeded", "failed"):
            raise GenerationFinishedError(
                f"generation {generation_id} already {record.status}; nothing to cancel"
            )
        record = await self.queue.cancel(generation_id) or record
        return await self.present(record)

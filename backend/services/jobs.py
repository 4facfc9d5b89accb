"""Video jobs through the API: records in storage, their manifest's assets with URLs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mv.ids import parse_image_id, parse_job_id
from mv.jobs import CreateJobRequest, Job, JobAsset, JobRecord, new_job_id
from mv.lists import JobListItem, JobPage
from mv.principals import EVERYONE, Principal
from services.asset_persistence import (
    CHARACTER_REFERENCES_CATEGORY,
    AssetPersistenceService,
    JobManifest,
    JobNotFoundError,
    utc_now,
)
from services.idempotency import IdempotencyStore
from services.owner_index import OwnerIndex
from services.storage import (
    IMAGE_CONTENT_TYPES,
    JOB_CHARACTER_REFERENCE_DIR,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    job_asset_key,
    job_manifest_key,
)

JOB_RECORDS_PREFIX = "job_records"
JOB_INDEX_ROOT = f"{JOB_RECORDS_PREFIX}/index"
ALL_JOBS = "all"
CREATE_SCOPE = "jobs"


class JobExistsError(StorageError):
    """A job with this id already exists."""


def job_record_key(job_id: str) -> str:
    """Key of a job's record (apart from its assets, which a worker's directory mirrors)."""
    return f"{JOB_RECORDS_PREFIX}/{parse_job_id(job_id)}.json"


class JobService:
    """Creates jobs, attaches character references, and lists a job's assets with URLs."""

    def __init__(self, assets: AssetPersistenceService, idempotency: IdempotencyStore) -> None:
        self.assets = assets
        self.storage = assets.storage
        self.idempotency = idempotency
        self.index = OwnerIndex(self.storage, JOB_INDEX_ROOT)

    async def create(
        self,
        body: CreateJobRequest,
        idempotency_key: str | None = None,
        principal: Principal = EVERYONE,
    ) -> Job:
        """Store a new job record; JobExistsError when the id is taken (409). An
        Idempotency-Key is `principal`'s own."""
        if idempotency_key is None:
            return await self.get(await self._create(body, principal.owner))
        fingerprinted = body.model_dump(mode="json")
        reservation = self.idempotency.reserve(
            CREATE_SCOPE, idempotency_key, fingerprinted, principal.owner
        )
        async with reservation as slot:
            job_id = slot.existing or await self._create(body, principal.owner)
            slot.record(job_id)
        return await self.get(job_id)

    async def _create(self, body: CreateJobRequest, owner: str | None) -> str:
        job_id = body.job_id or new_job_id()
        record = JobRecord(job_id=job_id, created_at=utc_now(), metadata=body.metadata, owner=owner)
        if await asyncio.to_thread(self.storage.exists, job_manifest_key(job_id)):
            raise JobExistsError(f"job {job_id} already exists")  # a worker persisted it
        try:
            # Create-if-absent in the store itself: of replicas racing to create one id,
            # exactly one wins.
            await asyncio.to_thread(
                self.storage.put_if_absent,
                job_record_key(job_id),
                record.model_dump_json(indent=2).encode(),
                "application/json",
            )
        except PreconditionFailedError:
            raise JobExistsError(f"job {job_id} already exists") from None
        await asyncio.to_thread(self.index.add, owner, [ALL_JOBS], record.created_at, job_id)
        return job_id

    async def list_jobs(self, owner: str | None, limit: int, cursor: str | None = None) -> JobPage:
        """One page of `owner`'s jobs, newest first (jobs a worker persisted without a record
        are not listed); InvalidCursorError for a cursor that is not this list's."""
        page = await asyncio.to_thread(self.index.page, owner, ALL_JOBS, limit, cursor)
        records = await asyncio.gather(
            *(asyncio.to_thread(self._read_record, job_id) for job_id in page.item_ids)
        )
        items = [
            JobListItem(
                job_id=record.job_id, created_at=record.created_at, metadata=record.metadata
            )
            for record in records
            if record is not None  # deleted this very moment
        ]
        return JobPage(items=items, next_cursor=page.next_cursor)

    async def check_visible(self, job_id: str, viewer: Principal = EVERYONE) -> None:
        """JobNotFoundError unless the job exists (created through the API, or persisted by a
        worker) and `viewer` may see it. A job a worker persisted without a record has no
        owner: an operator's only."""
        await self._visible_record(parse_job_id(job_id), viewer)

    async def _visible_record(self, job_id: str, viewer: Principal) -> JobRecord | None:
        """The job's record (None for a job a worker persisted without one); JobNotFoundError
        unless the job exists and `viewer` may see it."""
        record = await asyncio.to_thread(self._read_record, job_id)
        if record is None and not await asyncio.to_thread(
            self.storage.exists, job_manifest_key(job_id)
        ):
            raise JobNotFoundError(job_id)
        if not viewer.may_see(record.owner if record is not None else None):
            raise JobNotFoundError(job_id)
        return record

    def _read_record(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate_json(self.storage.get_bytes(job_record_key(job_id)))
        except ObjectNotFoundError:
            return None

    async def get(self, job_id: str, viewer: Principal = EVERYONE) -> Job:
        """The job with every asset of its manifest; JobNotFoundError when neither exists, or
        `viewer` may not see it.

        A job a worker persisted without creating it through the API has no record: it is
        shown from its manifest alone (to operators, when there are owners).
        """
        job_id = parse_job_id(job_id)
        record, manifest = await asyncio.gather(
            asyncio.to_thread(self._read_record, job_id), self._manifest_or_none(job_id)
        )
        if record is None and manifest is None:
            raise JobNotFoundError(job_id)
        if not viewer.may_see(record.owner if record is not None else None):
            raise JobNotFoundError(job_id)
        assets = await asyncio.to_thread(self._assets_with_urls, job_id, manifest)
        manifest_url = None
        if manifest is not None:
            manifest_url = await asyncio.to_thread(
                self.assets.urls.for_key, job_manifest_key(job_id)
            )
        return Job(
            job_id=job_id,
            created_at=record.created_at if record else manifest.created_at if manifest else None,
            metadata=record.metadata if record else {},
            character_references=[a for a in assets if a.image_id is not None],
            assets=assets,
            manifest_url=manifest_url,
        )

    async def _visible_manifest(self, job_id: str, viewer: Principal) -> JobManifest | None:
        """The job's manifest (None if it has none), once `viewer` is known to see the job;
        an operator sees every job, so only the manifest is read."""
        if viewer.operator:
            return await self._manifest_or_none(job_id)
        _, manifest = await asyncio.gather(
            self.check_visible(job_id, viewer), self._manifest_or_none(job_id)
        )
        return manifest

    async def _manifest_or_none(self, job_id: str) -> JobManifest | None:
        try:
            return await self.assets.get_job_manifest(job_id)
        except JobNotFoundError:
            return None

    def _assets_with_urls(self, job_id: str, manifest: JobManifest | None) -> list[JobAsset]:
        if manifest is None:
            return []
        assets = []
        for entry in manifest.files:
            key = job_asset_key(job_id, entry.path)
            image_id = thumbnail_url = None
            if entry.category == CHARACTER_REFERENCES_CATEGORY:
                image_id = _image_id_of(entry.path)
            if image_id is not None:
                thumbnail_url = self.assets.urls.thumbnail(key)
            assets.append(
                JobAsset(
                    **entry.model_dump(),
                    url=self.assets.urls.for_key(key),
                    image_id=image_id,
                    thumbnail_url=thumbnail_url,
                )
            )
        return assets

    async def delete(self, job_id: str, viewer: Principal = EVERYONE) -> list[str]:
        """Delete every file of the job, its manifest and then its record (the job's copies of
        character references included); return the keys removed. JobNotFoundError if absent
        or another owner's than `viewer` may see.
        """
        job_id = parse_job_id(job_id)
        record = await self._visible_record(job_id, viewer)
        if record is not None:  # out of its owner's list first
            await asyncio.to_thread(
                self.index.remove, record.owner, [ALL_JOBS], record.created_at, job_id
            )
        removed = await self.assets.delete_job_assets(job_id)
        await asyncio.to_thread(self.storage.delete, job_record_key(job_id))  # "it exists": last
        return [*removed, job_record_key(job_id)]

    async def attach(
        self, job_id: str, image_ids: Sequence[str], viewer: Principal = EVERYONE
    ) -> Job:
        """Attach stored character references `viewer` may see to an existing job
        (idempotent)."""
        job_id = parse_job_id(job_id)
        await self.check_visible(job_id, viewer)
        await self.assets.attach_character_references(job_id, image_ids, viewer)
        return await self.get(job_id, viewer)

    async def character_reference_key(
        self, job_id: str, image_id: str, viewer: Principal = EVERYONE
    ) -> tuple[str, str | None]:
        """Key and sha256 of a character reference attached to a job `viewer` may see;
        raises if it is not."""
        job_id, image_id = parse_job_id(job_id), parse_image_id(image_id)
        manifest = await self._visible_manifest(job_id, viewer)
        for entry in manifest.files if manifest else []:
            if _image_id_of(entry.path) == image_id:
                return job_asset_key(job_id, entry.path), entry.sha256
        for extension in IMAGE_CONTENT_TYPES:  # stored under the job, not (yet) in its manifest
            key = job_asset_key(job_id, f"{JOB_CHARACTER_REFERENCE_DIR}/{image_id}.{extension}")
            if await asyncio.to_thread(self.storage.exists, key):
                return key, None
        raise ObjectNotFoundError(
            image_id, f"character reference {image_id} is not attached to job {job_id}"
        )

    async def asset_key(
        self, job_id: str, path: str, viewer: Principal = EVERYONE
    ) -> tuple[str, str | None]:
        """Key and (when the manifest lists it) sha256 of a file of a job `viewer` may see."""
        key = job_asset_key(job_id, path)
        manifest = await self._visible_manifest(parse_job_id(job_id), viewer)
        for entry in manifest.files if manifest else []:
            if entry.path == path:
                return key, entry.sha256
        return key, None


def _image_id_of(relative_path: str) -> str | None:
    head, _, name = relative_path.partition("/")
    if head != JOB_CHARACTER_REFERENCE_DIR or "/" in name:
        return None
    try:
        return parse_image_id(name.rpartition(".")[0])
    except ValueError:
        return None

"""AssetPersistenceService: the one object routes and scripts hold for stored assets.

Each method validates ids before any I/O, runs storage work on worker threads (so it is safe
to await from the event loop) and hands the work to the collaborator that owns it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from config import Settings, get_settings
from mv.ids import InvalidKeyError, parse_image_id, parse_job_id
from mv.lists import CharacterReferenceListItem, CharacterReferencePage
from mv.principals import EVERYONE, Principal
from services.asset_persistence.deletion import (
    Announce,
    delete_character_reference,
    delete_job_files,
)
from services.asset_persistence.delivery import ImageDelivery
from services.asset_persistence.job_directories import JobDirectories, JobUrls
from services.asset_persistence.job_references import JobReferences
from services.asset_persistence.listing import ListFilter
from services.asset_persistence.manifests import JobManifests, merger_for
from services.asset_persistence.records import (
    CharacterReferenceRecord,
    GenerationDetails,
    JobManifest,
    ManifestEntry,
)
from services.asset_persistence.references import (
    CharacterReferenceNotFoundError,
    CharacterReferences,
    StoredCharacterReference,
    job_entry,
    prepare_bytes,
    prepare_file,
)
from services.asset_persistence.shared_deletes import Kind, SharedDeletes
from services.asset_persistence.signing import url_signer
from services.asset_persistence.thumbnails import ThumbnailStore
from services.asset_persistence.urls import AssetUrls, LocalAssetUrls
from services.storage import (
    CachesSharedObjects,
    HoldsPendingUploads,
    ObjectNotFoundError,
    StorageBackend,
    character_reference_key,
    get_storage_backend,
    job_character_reference_key,
    normalize_image_extension,
)


class AssetPersistenceService:
    """Stores images and job directories in the configured backend and hands out URLs.

    `AssetPersistenceService()` builds its storage from the settings;
    `AssetPersistenceService(storage_backend=b)` uses the one given (tests, embedding).
    """

    def __init__(
        self,
        storage_backend: StorageBackend | None = None,
        *,
        settings: Settings | None = None,
        on_conflict: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings = settings or get_settings()
        self.storage = storage = storage_backend or get_storage_backend(settings)
        self.urls = AssetUrls(
            storage,
            LocalAssetUrls(settings.public_base_url, url_signer(settings)),
            settings.presigned_url_expiry,
        )
        self.references = CharacterReferences(storage, self.urls)
        self.manifests = JobManifests(storage, on_conflict)
        self.job_references = JobReferences(storage, self.references, self.manifests, self.urls)
        self.job_directories = JobDirectories(
            storage, self.manifests, self.urls, settings.storage_max_concurrency
        )
        self.delivery = ImageDelivery(
            storage,
            self.references,
            ThumbnailStore(storage),
            serve_from_cloud=settings.serve_from_cloud,
            presigned_url_expiry=settings.presigned_url_expiry,
        )
        self._pending = storage if isinstance(storage, HoldsPendingUploads) else None
        # Replicas that cache a shared tier tell each other of deletes.
        self.shared_deletes = (
            SharedDeletes(storage, self.delivery, self.references)
            if isinstance(storage, CachesSharedObjects)
            else None
        )

    def _announcer(self, kind: Kind, id_: str) -> Announce | None:
        shared = self.shared_deletes
        return None if shared is None else functools.partial(shared.announce, kind, id_)

    # ------------------------------------------------------------ the Python API

    async def persist_character_reference(
        self,
        image_id: str,
        local_image_path: str | os.PathLike[str],
        job_id: str | None = None,
        *,
        details: GenerationDetails | None = None,
    ) -> str:
        """Store an image under the standalone key (with its sidecar) or the job's; return its URL.

        Raises FileNotFoundError if the file is missing and UnsupportedImageError if it is not a
        PNG, JPEG or WebP image.
        """
        image_id = parse_image_id(image_id)
        job_id = parse_job_id(job_id) if job_id is not None else None
        image = await asyncio.to_thread(prepare_file, Path(local_image_path))
        if job_id is None:
            return (await self.references.store(image_id, image, None, details)).url
        key = job_character_reference_key(job_id, image_id, image.kind.extension)
        await asyncio.to_thread(self.storage.put_bytes, key, image.data, image.kind.content_type)
        await self.manifests.add(job_id, [job_entry(image_id, image)])
        return await self.urls.for_stored_key(key)

    async def associate_character_images_with_job(
        self, job_id: str, image_ids: Sequence[str], local_base_path: str | os.PathLike[str]
    ) -> list[str]:
        """Copy stored images into {local_base_path}/character_reference/ and under the job.

        Returns one URL per image, in order; CharacterReferenceNotFoundError names an unknown id.
        """
        job_id = parse_job_id(job_id)
        if isinstance(image_ids, str):
            raise InvalidKeyError("image_ids must be a list of ids, not one string")
        ids = [parse_image_id(image_id) for image_id in image_ids]
        return await asyncio.to_thread(
            self.job_references.copy_to_directory, job_id, ids, Path(local_base_path)
        )

    async def get_character_reference_url(
        self, image_id: str, job_id: str | None = None, extension: str = "png"
    ) -> str | None:
        """URL of a stored character reference (presigned in S3 mode), None if absent."""
        if job_id is None:
            key = character_reference_key(image_id, extension)
        else:
            key = job_character_reference_key(job_id, image_id, extension)
        return self.urls.inline(key) or await asyncio.to_thread(self.urls.if_exists, key)

    async def persist_job_assets(
        self, job_id: str, local_base_path: str | os.PathLike[str]
    ) -> JobUrls:
        """Store every file of a job directory (recursively) and list them in its manifest.

        The manifest keeps what other writers listed (images attached through the API, say):
        the directory's files are merged into it, after they are all stored.
        Returns {"character_references": [urls], <one list per top-level folder>,
        "files": [urls of top-level files] (when there are any), "manifest": url}.
        """
        job_id = parse_job_id(job_id)
        base = Path(local_base_path)
        entries = await asyncio.to_thread(self.job_directories.upload, job_id, base)
        await self.manifests.add(job_id, entries)
        return await asyncio.to_thread(self.job_directories.urls_by_category, job_id, entries)

    async def download_job_assets(
        self, job_id: str, local_base_path: str | os.PathLike[str]
    ) -> list[str]:
        """Restore a job directory under `local_base_path`, every file checked against its sha256.

        Returns the local paths in manifest order. Files are written atomically: a corrupted
        object raises IntegrityError and leaves no partial file behind.
        """
        job_id = parse_job_id(job_id)
        base = Path(local_base_path)
        return await asyncio.to_thread(self.job_directories.download, job_id, base)

    async def delete_character_reference(
        self, image_id: str, viewer: Principal = EVERYONE
    ) -> list[str]:
        """Delete a standalone image, its sidecar and thumbnails from every tier (copies under
        jobs stay); return the keys removed. CharacterReferenceNotFoundError if none existed,
        or if it is another owner's than `viewer` may see.
        """
        image_id = parse_image_id(image_id)
        # The sidecar goes last, so a delete that failed half-way still says whose it was
        # (and which lists hold it).
        record = await asyncio.to_thread(self.references.read_record, image_id)
        if not viewer.may_see(record.owner if record is not None else None):
            raise CharacterReferenceNotFoundError(image_id)
        removed = await delete_character_reference(
            self.storage, image_id, record, self._announcer("image", image_id)
        )
        self.references.forget_location(image_id)
        self.delivery.forget(removed)
        if not removed:
            raise CharacterReferenceNotFoundError(image_id)
        return removed

    async def delete_job_assets(self, job_id: str) -> list[str]:
        """Delete every stored file of a job and then its manifest; return the keys removed."""
        job_id = parse_job_id(job_id)
        async with self.manifests.job_lock(job_id):  # not in the middle of this replica's merges
            removed = await delete_job_files(self.storage, job_id, self._announcer("job", job_id))
        self.delivery.forget(removed)
        return removed

    # ------------------------------------------------------- what the API adds

    async def store_character_reference(
        self,
        image_id: str,
        data: bytes,
        *,
        job_id: str | None = None,
        details: GenerationDetails | None = None,
    ) -> StoredCharacterReference:
        """Store image bytes under the standalone key with its sidecar (and the job's, if given).

        With a `job_id`, the copy under the job is not yet listed in its manifest: the caller
        passes the `job_entry` of every image of a request to `add_to_job_manifest` at once.
        Raises UnsupportedImageError unless `data` is a PNG, JPEG or WebP image.
        """
        image_id = parse_image_id(image_id)
        job_id = parse_job_id(job_id) if job_id is not None else None
        image = await asyncio.to_thread(prepare_bytes, data)
        return await self.references.store(image_id, image, job_id, details)

    async def get_character_reference_record(
        self, image_id: str, viewer: Principal = EVERYONE
    ) -> CharacterReferenceRecord:
        """The sidecar of a standalone image; CharacterReferenceNotFoundError if absent (or
        another owner's than `viewer` may see)."""
        image_id = parse_image_id(image_id)
        record = await asyncio.to_thread(self.references.read_record, image_id)
        if record is None or not viewer.may_see(record.owner):
            raise CharacterReferenceNotFoundError(image_id)
        return record

    async def read_character_reference(
        self, image_id: str, viewer: Principal = EVERYONE
    ) -> tuple[str, bytes]:
        """The key and bytes of a standalone image, from whichever tier holds them (a pending
        upload too); CharacterReferenceNotFoundError if it does not exist (or no longer does),
        or is another owner's than `viewer` may see."""
        image_id = parse_image_id(image_id)
        return await asyncio.to_thread(self._read_character_reference, image_id, viewer)

    def _read_character_reference(self, image_id: str, viewer: Principal) -> tuple[str, bytes]:
        key = self.references.find_visible(image_id, viewer).key
        try:
            return key, self.storage.get_bytes(key)
        except ObjectNotFoundError:  # deleted since it was found (by another replica)
            self.references.forget_locations()
            raise CharacterReferenceNotFoundError(image_id) from None

    async def check_character_references_exist(
        self, image_ids: Sequence[str], viewer: Principal = EVERYONE
    ) -> None:
        """Raise CharacterReferenceNotFoundError naming the first id with no stored image
        that `viewer` may see."""
        ids = [parse_image_id(image_id) for image_id in image_ids]
        await asyncio.to_thread(self._check_exist, ids, viewer)

    def _check_exist(self, image_ids: Sequence[str], viewer: Principal) -> None:
        for image_id in image_ids:
            key = self.references.find_visible(image_id, viewer).key
            if not self.storage.exists(key):  # deleted since it was found (by another replica)
                self.references.forget_locations()
                raise CharacterReferenceNotFoundError(image_id)

    async def attach_character_references(
        self, job_id: str, image_ids: Sequence[str], viewer: Principal = EVERYONE
    ) -> JobManifest:
        """Copy stored images under the job and list them in its manifest (idempotent).

        The server-side counterpart of associate_character_images_with_job, for clients with
        no job directory. CharacterReferenceNotFoundError names an unknown id (or one that
        `viewer` may not see); then nothing is copied.
        """
        job_id = parse_job_id(job_id)
        ids = [parse_image_id(image_id) for image_id in image_ids]
        entries = await asyncio.to_thread(self.job_references.copy_into_job, job_id, ids, viewer)
        return await self.manifests.add(job_id, entries)

    async def list_character_references(
        self, owner: str | None, which: ListFilter, limit: int, cursor: str | None = None
    ) -> CharacterReferencePage:
        """One page of `owner`'s standalone images, newest first: a listing and one sidecar
        read per image, whatever the owner has stored. InvalidCursorError for a cursor that
        is not this list's."""
        page = await asyncio.to_thread(self.references.index.page, owner, which, limit, cursor)
        records = await asyncio.gather(
            *(asyncio.to_thread(self.references.read_record, id_) for id_ in page.item_ids)
        )
        # An entry whose image is gone (deleted or expired this very moment) is left out.
        present = [record for record in records if record is not None]
        items = await asyncio.to_thread(lambda: [self._list_item(r) for r in present])
        return CharacterReferencePage(items=items, next_cursor=page.next_cursor)

    def _list_item(self, record: CharacterReferenceRecord) -> CharacterReferenceListItem:
        extension = normalize_image_extension(record.content_type.rpartition("/")[2])
        key = character_reference_key(record.id, extension)
        return CharacterReferenceListItem(
            id=record.id,
            url=self.urls.for_key(key),
            thumbnail_url=self.urls.thumbnail(key),
            created_at=record.created_at,
            character_description=record.description,
            seed=record.seed,
            width=record.width,
            height=record.height,
            content_type=record.content_type,
            view=record.view,
            reference_image_ids=record.reference_image_ids,
        )

    async def add_to_job_manifest(
        self, job_id: str, entries: Sequence[ManifestEntry]
    ) -> JobManifest:
        """List files already stored under a job in its manifest; the manifest afterwards.

        Safe against every other writer of the manifest, in this process or any other: the
        merge is a compare-and-swap, retried when another writer got in first.
        """
        return await self.manifests.add(parse_job_id(job_id), entries)

    async def get_job_manifest(self, job_id: str) -> JobManifest:
        """The stored manifest of a job; JobNotFoundError if there is none."""
        job_id = parse_job_id(job_id)
        return await asyncio.to_thread(self.manifests.read, job_id)

    # ------------------------------------------------------------ maintenance

    async def retry_pending_uploads(self) -> list[str]:
        """Upload objects that earlier failed to reach S3 (never one another replica deleted
        meanwhile); return the keys uploaded."""
        pending = self._pending
        if pending is None:
            return []

        async def retry() -> list[str]:
            return await asyncio.to_thread(pending.retry_pending, merger_for)

        if self.shared_deletes is None:
            return await retry()
        return await self.shared_deletes.retry_pending(retry)

    async def catch_up_on_deletes(self) -> int:
        """Drop what this replica cached of images and jobs other replicas deleted since the
        last call; return how many deletes were applied (0 where no tier is shared)."""
        if self.shared_deletes is None:
            return 0
        return len(await self.shared_deletes.catch_up())

    def pending_uploads(self) -> Iterable[str]:
        """Keys stored locally that still wait for an upload."""
        if self._pending is None:
            return []
        return self._pending.pending_keys()

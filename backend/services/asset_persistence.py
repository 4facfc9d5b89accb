"""AssetPersistenceService: character reference images and job directories in storage."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from config import Settings, get_settings
from services import asset_deletion
from services.asset_records import (
    CharacterReferenceRecord,
    GenerationDetails,
    JobManifest,
    ManifestEntry,
)
from services.asset_urls import LocalAssetUrls
from services.image_files import ImageKind, UnsupportedImageError, identify_image
from services.storage.atomic import is_temp_file, sha256_file
from services.storage.base import Merge
from services.storage.conditional import read_latest, update_object
from services.storage.errors import StorageUnavailableError
from services.storage.keys import (
    IMAGE_CONTENT_TYPES,
    JOB_CHARACTER_REFERENCE_DIR,
    MANIFEST_NAME,
    THUMBNAIL_SIZES,
    character_reference_key,
    character_reference_sidecar_key,
    job_asset_key,
    job_character_reference_key,
    job_manifest_key,
    normalize_image_extension,
    parse_image_id,
    parse_job_id,
    parse_job_manifest_key,
    validate_key,
)
from services.storage.local import content_type_for
from services.storage_backend import (
    HoldsPendingUploads,
    IntegrityError,
    InvalidKeyError,
    ObjectNotFoundError,
    SignsKnownKeysWithoutIO,
    SignsUrls,
    StorageBackend,
    StorageError,
    get_storage_backend,
)
from services.url_signing import url_signer

logger = logging.getLogger(__name__)

CHARACTER_REFERENCES_CATEGORY = "character_references"
DEFAULT_THUMBNAIL_SIZE = THUMBNAIL_SIZES[0]  # the `thumbnail_url` of replies
TOP_LEVEL_FILES_CATEGORY = "files"
_RESERVED_CATEGORIES = {"manifest"}

__all__ = [
    "AssetPersistenceService",
    "CharacterReferenceNotFoundError",
    "JobNotFoundError",
    "StoredCharacterReference",
    "UnsupportedImageError",
]


class CharacterReferenceNotFoundError(ObjectNotFoundError):
    """No stored character reference has this id."""

    def __init__(self, image_id: str) -> None:
        super().__init__(image_id, f"character reference {image_id} not found")
        self.image_id = image_id


class JobNotFoundError(ObjectNotFoundError):
    """No such job (for the Python API: no manifest is stored for it)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} not found")
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class _PreparedImage:
    data: bytes
    kind: ImageKind
    sha256: str


def _prepare_bytes(data: bytes, kind: ImageKind | None = None) -> _PreparedImage:
    kind = kind or identify_image(data)
    return _PreparedImage(data, kind, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True, slots=True)
class StoredCharacterReference:
    """Where a character reference was stored, and what it is."""

    id: str
    key: str
    url: str
    cloud_url: str | None
    thumbnail_url: str
    kind: ImageKind
    sha256: str
    size: int
    job_entry: ManifestEntry | None = None  # its copy under a job, for the job's manifest


@dataclass(frozen=True, slots=True)
class _JobFile:
    relative_path: str
    path: Path
    category: str


def _job_entry(image_id: str, image: _PreparedImage) -> ManifestEntry:
    """The manifest entry of an image's copy under a job."""
    return ManifestEntry(
        path=f"{JOB_CHARACTER_REFERENCE_DIR}/{image_id}.{image.kind.extension}",
        category=CHARACTER_REFERENCES_CATEGORY,
        size=len(image.data),
        sha256=image.sha256,
        content_type=image.kind.content_type,
    )


def merge_manifest(
    current: JobManifest | None, job_id: str, entries: Iterable[ManifestEntry]
) -> JobManifest | None:
    """`current` with `entries` added (replacing entries of the same path); None if unchanged.

    Merges commute for distinct paths, which is what lets replicas apply them in any order.
    """
    listed = {entry.path: entry for entry in current.files} if current is not None else {}
    changed = current is None
    for entry in entries:
        if listed.get(entry.path) != entry:
            listed[entry.path] = entry
            changed = True
    if not changed:
        return None
    files = sorted(listed.values(), key=lambda entry: entry.path)
    if current is None:
        return JobManifest(job_id=job_id, files=files)
    return current.model_copy(update={"files": files})


def _category_of(relative_path: str) -> str:
    head, _, rest = relative_path.partition("/")
    if not rest:
        return TOP_LEVEL_FILES_CATEGORY
    return CHARACTER_REFERENCES_CATEGORY if head == JOB_CHARACTER_REFERENCE_DIR else head


class AssetPersistenceService:
    """Stores images and job directories in the configured backend and hands out URLs.

    Every method validates ids before any I/O and runs storage work on worker threads, so it
    is safe to await from the event loop.
    """

    def __init__(
        self,
        storage_backend: StorageBackend | None = None,
        *,
        settings: Settings | None = None,
        on_conflict: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        # Told how many times another writer got to a job manifest first, per merge.
        self._on_conflict = on_conflict
        self.storage = storage_backend or get_storage_backend(self.settings)
        self.local_urls = LocalAssetUrls(self.settings.public_base_url, url_signer(self.settings))
        self._max_workers = self.settings.storage_max_concurrency
        # Capabilities are fixed per backend: check them once, not per URL.
        self._signer = self.storage if isinstance(self.storage, SignsUrls) else None
        self._pending_store = (
            self.storage if isinstance(self.storage, HoldsPendingUploads) else None
        )
        self._inline_signer = (
            self.storage if isinstance(self.storage, SignsKnownKeysWithoutIO) else None
        )
        # Stored references never change or go away, so where one was found is remembered;
        # a miss is not, so an image stored later (by another replica, say) is found then.
        self.lookup_character_reference = functools.lru_cache(maxsize=65_536)(
            self._find_character_reference
        )
        # Weak: a job's lock lives only while someone holds or waits for it.
        self._job_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # ----------------------------------------------------------------- URLs

    def url_for_key(self, key: str) -> str:
        """URL of a stored key: presigned when the store signs (and holds it), else the API path.

        Blocking (presigning may refresh credentials): call it off the event loop.
        """
        if self._signer is not None and self.is_presigned(key):
            return self._signer.presign(key, self.settings.presigned_url_expiry).url
        # Local mode, or an upload still pending: the API serves the local copy.
        return self.local_urls.for_key(key)

    def _inline_url(self, key: str) -> str | None:
        """A presigned URL computed on the caller's thread, or None when that would need I/O.

        A key known to be in S3, with credentials that need no refresh, is pure computation,
        cheaper than the hop to a worker thread.
        """
        if self._inline_signer is None:
            return None
        signed = self._inline_signer.presign_known(key, self.settings.presigned_url_expiry)
        return None if signed is None else signed.url

    async def _url_for_stored_key(self, key: str) -> str:
        """URL of a key just written."""
        return self._inline_url(key) or await asyncio.to_thread(self.url_for_key, key)

    def thumbnail_url(self, image_key: str, size: int = DEFAULT_THUMBNAIL_SIZE) -> str:
        """URL of the thumbnail of a stored character reference (made on first request)."""
        return self.local_urls.for_path(self.local_urls.thumbnail_path(image_key, size))

    def _url_if_exists(self, key: str) -> str | None:
        return self.url_for_key(key) if self.storage.exists(key) else None

    async def get_character_reference_url(
        self, image_id: str, job_id: str | None = None, extension: str = "png"
    ) -> str | None:
        """URL of a stored character reference (presigned in S3 mode), None if absent."""
        if job_id is None:
            key = character_reference_key(image_id, extension)
        else:
            key = job_character_reference_key(job_id, image_id, extension)
        return self._inline_url(key) or await asyncio.to_thread(self._url_if_exists, key)

    # ------------------------------------------------- character references

    @staticmethod
    def _prepare_image(source: Path) -> _PreparedImage:
        if not source.is_file():
            raise FileNotFoundError(f"character reference image not found: {source}")
        data = source.read_bytes()
        kind = identify_image(data)
        suffix = source.suffix.lower().lstrip(".")
        if suffix in {*IMAGE_CONTENT_TYPES, "jpeg"} and normalize_image_extension(suffix) != (
            kind.extension
        ):
            raise UnsupportedImageError(
                f"{source.name}: the name says {suffix} but the content is {kind.extension}"
            )
        return _prepare_bytes(data, kind)

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
        image = await asyncio.to_thread(self._prepare_image, Path(local_image_path))
        if job_id is not None:
            key = job_character_reference_key(job_id, image_id, image.kind.extension)
            await asyncio.to_thread(
                self.storage.put_bytes, key, image.data, image.kind.content_type
            )
            await self.add_to_job_manifest(job_id, [_job_entry(image_id, image)])
            return await self._url_for_stored_key(key)
        stored = await self._store_standalone(image_id, image, None, details)
        return stored.url

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
        image = await asyncio.to_thread(_prepare_bytes, data)
        return await self._store_standalone(image_id, image, job_id, details)

    async def _store_standalone(
        self,
        image_id: str,
        image: _PreparedImage,
        job_id: str | None,
        details: GenerationDetails | None,
    ) -> StoredCharacterReference:
        key = character_reference_key(image_id, image.kind.extension)
        record = CharacterReferenceRecord(
            id=image_id,
            width=image.kind.width,
            height=image.kind.height,
            content_type=image.kind.content_type,
            sha256=image.sha256,
            size=len(image.data),
            **(details or GenerationDetails()).model_dump(),
        )
        writes = [
            (key, image.data, image.kind.content_type),
            (
                character_reference_sidecar_key(image_id),
                record.model_dump_json(indent=2).encode(),
                "application/json",
            ),
        ]
        if job_id is not None:
            job_key = job_character_reference_key(job_id, image_id, image.kind.extension)
            writes.append((job_key, image.data, image.kind.content_type))
        # Independent writes: send them together.
        await asyncio.gather(
            *(asyncio.to_thread(self.storage.put_bytes, *write) for write in writes)
        )
        url = await self._url_for_stored_key(key)
        return StoredCharacterReference(
            id=image_id,
            key=key,
            url=url,
            cloud_url=url if self.is_presigned(key) else None,
            thumbnail_url=self.thumbnail_url(key),
            kind=image.kind,
            sha256=image.sha256,
            size=len(image.data),
            job_entry=_job_entry(image_id, image) if job_id is not None else None,
        )

    def is_presigned(self, key: str) -> bool:
        """Whether url_for_key(key) gives a presigned URL (S3 mode, upload not pending)."""
        pending = self._pending_store is not None and self._pending_store.is_pending(key)
        return self._signer is not None and not pending

    def _read_record(self, image_id: str) -> CharacterReferenceRecord | None:
        try:
            raw = self.storage.get_bytes(character_reference_sidecar_key(image_id))
        except ObjectNotFoundError:
            return None
        return CharacterReferenceRecord.model_validate_json(raw)

    async def get_character_reference_record(self, image_id: str) -> CharacterReferenceRecord:
        """The sidecar of a standalone image; CharacterReferenceNotFoundError if absent."""
        image_id = parse_image_id(image_id)
        record = await asyncio.to_thread(self._read_record, image_id)
        if record is None:
            raise CharacterReferenceNotFoundError(image_id)
        return record

    def _find_character_reference(self, image_id: str) -> tuple[str, str | None]:
        """Key and expected sha256 of a standalone image, from its sidecar or by extension.

        Blocking; `lookup_character_reference` is the same with a memory of what was found.
        """
        record = self._read_record(image_id)
        if record is not None:
            extension = normalize_image_extension(record.content_type.rpartition("/")[2])
            key = character_reference_key(image_id, extension)
            if self.storage.exists(key):
                return key, record.sha256
        for extension in IMAGE_CONTENT_TYPES:
            key = character_reference_key(image_id, extension)
            if self.storage.exists(key):
                return key, None
        raise CharacterReferenceNotFoundError(image_id)

    def _associate(self, job_id: str, image_ids: list[str], base: Path) -> list[str]:
        # Resolve every id first, so an unknown one fails the call before anything is copied.
        found = [self.lookup_character_reference(image_id) for image_id in image_ids]
        urls = []
        for image_id, (key, sha256) in zip(image_ids, found, strict=True):
            extension = key.rpartition(".")[2]
            local_copy = base / JOB_CHARACTER_REFERENCE_DIR / f"{image_id}.{extension}"
            self.storage.download(key, local_copy, sha256)
            job_key = job_character_reference_key(job_id, image_id, extension)
            self.storage.put_file(job_key, local_copy, IMAGE_CONTENT_TYPES[extension])
            urls.append(self.url_for_key(job_key))
        return urls

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
        return await asyncio.to_thread(self._associate, job_id, ids, Path(local_base_path))

    def _copy_into_job(self, job_id: str, image_ids: list[str]) -> list[ManifestEntry]:
        # Resolve every id first, so an unknown one fails the call before anything is copied.
        found = [self.lookup_character_reference(image_id) for image_id in image_ids]
        manifest = self._read_manifest_or_none(job_id)
        listed = {entry.path: entry for entry in manifest.files} if manifest else {}
        entries = []
        for image_id, (key, sha256) in zip(image_ids, found, strict=True):
            extension = key.rpartition(".")[2]
            relative = f"{JOB_CHARACTER_REFERENCE_DIR}/{image_id}.{extension}"
            earlier = listed.get(relative)
            if sha256 is not None and earlier is not None and earlier.sha256 == sha256:
                entries.append(earlier)  # attached before: nothing to copy
                continue
            data = self.storage.get_bytes(key)
            digest = hashlib.sha256(data).hexdigest()
            if sha256 is not None and digest != sha256:
                raise IntegrityError(key, sha256, digest)
            content_type = IMAGE_CONTENT_TYPES[extension]
            self.storage.put_bytes(job_asset_key(job_id, relative), data, content_type)
            entries.append(
                ManifestEntry(
                    path=relative,
                    category=CHARACTER_REFERENCES_CATEGORY,
                    size=len(data),
                    sha256=digest,
                    content_type=content_type,
                )
            )
        return entries

    async def attach_character_references(
        self, job_id: str, image_ids: Sequence[str]
    ) -> JobManifest:
        """Copy stored images under the job and list them in its manifest (idempotent).

        The server-side counterpart of associate_character_images_with_job, for clients with
        no job directory. CharacterReferenceNotFoundError names an unknown id; then nothing
        is copied.
        """
        job_id = parse_job_id(job_id)
        ids = [parse_image_id(image_id) for image_id in image_ids]
        entries = await asyncio.to_thread(self._copy_into_job, job_id, ids)
        return await self.add_to_job_manifest(job_id, entries)

    async def add_to_job_manifest(
        self, job_id: str, entries: Sequence[ManifestEntry]
    ) -> JobManifest:
        """List files already stored under a job in its manifest; the manifest afterwards.

        Safe against every other writer of the manifest, in this process or any other: the
        merge is a compare-and-swap, retried when another writer got in first.
        """
        job_id = parse_job_id(job_id)
        async with self._job_lock(job_id):  # writers in this process queue instead of colliding
            return await asyncio.to_thread(self._merge_into_manifest, job_id, list(entries))

    def _merge_into_manifest(self, job_id: str, entries: list[ManifestEntry]) -> JobManifest:
        key = job_manifest_key(job_id)

        def change(raw: bytes | None) -> bytes | None:
            current = None if raw is None else self._parse_manifest(job_id, raw)
            merged = merge_manifest(current, job_id, entries)
            return None if merged is None else merged.model_dump_json(indent=2).encode()

        try:
            updated = update_object(self.storage, key, change)
        except StorageUnavailableError:
            if self._pending_store is None:
                raise
            return self._merge_into_local_manifest(job_id, entries)
        if updated.conflicts and self._on_conflict is not None:
            self._on_conflict(updated.conflicts)
        assert updated.data is not None  # a merge always leaves a manifest
        return self._parse_manifest(job_id, updated.data)

    def _merge_into_local_manifest(self, job_id: str, entries: list[ManifestEntry]) -> JobManifest:
        """The arbiter is unreachable: merge into the local copy, held as a pending upload.

        When the store is back, the pending copy is merged into whatever the store holds then
        (see `merger_for`), so nothing another replica wrote meanwhile is replaced.
        """
        assert self._pending_store is not None
        key = job_manifest_key(job_id)
        try:
            current = self._parse_manifest(job_id, self.storage.get_bytes(key))
        except (ObjectNotFoundError, StorageUnavailableError):
            current = None  # nothing known here: the later merge adds what the store has
        merged = merge_manifest(current, job_id, entries) or current
        assert merged is not None
        self._pending_store.hold(key, merged.model_dump_json(indent=2).encode(), "application/json")
        logger.warning("job %s: store unreachable, manifest kept locally until it is back", job_id)
        return merged

    @staticmethod
    def merger_for(key: str) -> Merge | None:
        """How a pending copy of `key` joins the stored one: job manifests merge, others not.

        For a path both list, the stored entry stands, as the stored object does.
        """
        job_id = parse_job_manifest_key(key)
        if job_id is None:
            return None

        def merge(mine: bytes, theirs: bytes) -> bytes:
            ours = JobManifest.model_validate_json(mine)
            stored = JobManifest.model_validate_json(theirs)
            listed = {entry.path for entry in stored.files}
            missing = [entry for entry in ours.files if entry.path not in listed]
            merged = merge_manifest(stored, job_id, missing) or stored
            return merged.model_dump_json(indent=2).encode()

        return merge

    @contextlib.asynccontextmanager
    async def _job_lock(self, job_id: str) -> AsyncIterator[None]:
        """One manifest update per job at a time in this process."""
        lock = self._job_locks.get(job_id)
        if lock is None:
            lock = self._job_locks[job_id] = asyncio.Lock()
        async with lock:
            yield

    # ------------------------------------------------------------ job assets

    @staticmethod
    def _job_files(base: Path) -> list[_JobFile]:
        if not base.is_dir():
            raise FileNotFoundError(f"job directory not found: {base}")
        files = []
        for directory, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(directory) / filename
                relative = path.relative_to(base).as_posix()
                if relative == MANIFEST_NAME or is_temp_file(path):
                    continue  # the manifest is rebuilt; temp files are unfinished writes
                if path.is_symlink():
                    logger.warning("skipping symlink in job directory: %s", relative)
                    continue
                validate_key(relative)
                category = _category_of(relative)
                if category in _RESERVED_CATEGORIES:
                    raise InvalidKeyError(f"top-level folder name {category!r} is reserved")
                files.append(_JobFile(relative, path, category))
        return files

    def _upload_job_files(self, job_id: str, base: Path) -> list[ManifestEntry]:
        files = self._job_files(base)

        def upload(job_file: _JobFile) -> ManifestEntry:
            key = job_asset_key(job_id, job_file.relative_path)
            content_type = content_type_for(job_file.relative_path)
            info = self.storage.put_file(key, job_file.path, content_type).info
            assert info.sha256 is not None  # every backend hashes what it writes
            return ManifestEntry(
                path=job_file.relative_path,
                category=job_file.category,
                size=info.size,
                sha256=info.sha256,
                content_type=content_type,
            )

        with ThreadPoolExecutor(self._max_workers, thread_name_prefix="job-persist") as pool:
            return list(pool.map(upload, files))

    def _job_urls(self, job_id: str, entries: list[ManifestEntry]) -> dict[str, list[str] | str]:
        result: dict[str, list[str] | str] = {CHARACTER_REFERENCES_CATEGORY: []}
        for entry in entries:
            urls = result.setdefault(entry.category, [])
            assert isinstance(urls, list)
            urls.append(self.url_for_key(job_asset_key(job_id, entry.path)))
        result["manifest"] = self.url_for_key(job_manifest_key(job_id))
        return result

    async def persist_job_assets(
        self, job_id: str, local_base_path: str | os.PathLike[str]
    ) -> dict[str, list[str] | str]:
        """Store every file of a job directory (recursively) and list them in its manifest.

        The manifest keeps what other writers listed (images attached through the API, say):
        the directory's files are merged into it, after they are all stored.
        Returns {"character_references": [urls], <one list per top-level folder>,
        "files": [urls of top-level files] (when there are any), "manifest": url}.
        """
        job_id = parse_job_id(job_id)
        entries = await asyncio.to_thread(self._upload_job_files, job_id, Path(local_base_path))
        await self.add_to_job_manifest(job_id, entries)
        return await asyncio.to_thread(self._job_urls, job_id, entries)

    @staticmethod
    def _parse_manifest(job_id: str, raw: bytes) -> JobManifest:
        manifest = JobManifest.model_validate_json(raw)
        if manifest.job_id != job_id:
            raise StorageError(f"manifest of job {job_id} names job {manifest.job_id}")
        return manifest

    def _read_manifest(self, job_id: str) -> JobManifest:
        """The manifest as the arbitrating tier holds it (another replica may have changed it)."""
        try:
            raw = read_latest(self.storage, job_manifest_key(job_id))
        except ObjectNotFoundError:
            raise JobNotFoundError(job_id) from None
        return self._parse_manifest(job_id, raw)

    def _read_manifest_or_none(self, job_id: str) -> JobManifest | None:
        try:
            return self._read_manifest(job_id)
        except JobNotFoundError:
            return None

    async def get_job_manifest(self, job_id: str) -> JobManifest:
        """The stored manifest of a job; JobNotFoundError if there is none."""
        job_id = parse_job_id(job_id)
        return await asyncio.to_thread(self._read_manifest, job_id)

    def _download_job(self, job_id: str, base: Path) -> list[str]:
        manifest = self._read_manifest(job_id)

        def fetch(entry: ManifestEntry) -> str:
            destination = base.joinpath(*entry.path.split("/"))
            if not _same_file_content(destination, entry):
                key = job_asset_key(job_id, entry.path)
                self.storage.download(key, destination, entry.sha256)
            return str(destination)

        base.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self._max_workers, thread_name_prefix="job-download") as pool:
            return list(pool.map(fetch, manifest.files))

    async def download_job_assets(
        self, job_id: str, local_base_path: str | os.PathLike[str]
    ) -> list[str]:
        """Restore a job directory under `local_base_path`, every file checked against its sha256.

        Returns the local paths in manifest order. Files are written atomically: a corrupted
        object raises IntegrityError and leaves no partial file behind.
        """
        job_id = parse_job_id(job_id)
        return await asyncio.to_thread(self._download_job, job_id, Path(local_base_path))

    # ------------------------------------------------------------- deletes

    async def delete_character_reference(self, image_id: str) -> list[str]:
        """Delete a standalone image, its sidecar and thumbnails from every tier (copies under
        jobs stay); return the keys removed. CharacterReferenceNotFoundError if none existed.
        """
        image_id = parse_image_id(image_id)
        removed = await asset_deletion.delete_character_reference(self.storage, image_id)
        self.lookup_character_reference.cache_clear()  # it remembers where images were found
        if not removed:
            raise CharacterReferenceNotFoundError(image_id)
        return removed

    async def delete_job_assets(self, job_id: str) -> list[str]:
        """Delete every stored file of a job and then its manifest; return the keys removed."""
        job_id = parse_job_id(job_id)
        async with self._job_lock(job_id):  # not in the middle of this replica's merges
            return await asset_deletion.delete_job_files(self.storage, job_id)

    # ---------------------------------------------------------- maintenance

    async def retry_pending_uploads(self) -> list[str]:
        """Upload objects that earlier failed to reach S3; return the keys uploaded."""
        if self._pending_store is None:
            return []
        return await asyncio.to_thread(self._pending_store.retry_pending, self.merger_for)

    def pending_uploads(self) -> Iterable[str]:
        """Keys stored locally that still wait for an upload."""
        if self._pending_store is None:
            return []
        return self._pending_store.pending_keys()


def _same_file_content(path: Path, entry: ManifestEntry) -> bool:
    """Whether `path` already holds exactly the manifest entry's bytes."""
    try:
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
    except OSError:
        return False
    return sha256_file(path)[0] == entry.sha256

"""Standalone character references: an image and its metadata sidecar, stored, found, read.

An image is stored under `character_references/{image_id}.{ext}` with its sidecar beside it;
where one was found is remembered, since a stored reference never changes (a delete forgets).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from mv.principals import Principal
from services.asset_persistence.images import ImageKind, UnsupportedImageError, identify_image
from services.asset_persistence.listing import CharacterReferenceIndex
from services.asset_persistence.records import (
    CHARACTER_REFERENCES_CATEGORY,
    CharacterReferenceRecord,
    GenerationDetails,
    ManifestEntry,
    read_sidecar,
)
from services.asset_persistence.urls import AssetUrls
from services.storage import (
    IMAGE_CONTENT_TYPES,
    JOB_CHARACTER_REFERENCE_DIR,
    ObjectNotFoundError,
    StorageBackend,
    character_reference_key,
    character_reference_sidecar_key,
    job_character_reference_key,
    normalize_image_extension,
)

# Where images were found, per replica; a stored reference never changes, so this only grows
# stale through deletes, which clear it.
MAX_REMEMBERED_LOCATIONS = 65_536


@dataclass(frozen=True, slots=True)
class FoundImage:
    """Where a standalone image is stored, what its bytes hash to, and whose it is."""

    key: str
    sha256: str | None  # None for an image with no sidecar
    owner: str | None


class CharacterReferenceNotFoundError(ObjectNotFoundError):
    """No stored character reference has this id."""

    def __init__(self, image_id: str) -> None:
        super().__init__(image_id, f"character reference {image_id} not found")
        self.image_id = image_id


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """Image bytes ready to store: their format, dimensions and sha256."""

    data: bytes
    kind: ImageKind
    sha256: str


def prepare_bytes(data: bytes, kind: ImageKind | None = None) -> PreparedImage:
    """`data` identified (UnsupportedImageError unless PNG, JPEG or WebP) and hashed."""
    kind = kind or identify_image(data)
    return PreparedImage(data, kind, hashlib.sha256(data).hexdigest())


def prepare_file(source: Path) -> PreparedImage:
    """The image file at `source`, whose name may not claim another format than its bytes.

    FileNotFoundError if it is missing; UnsupportedImageError if it is not an image.
    """
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
    return prepare_bytes(data, kind)


def job_entry(image_id: str, image: PreparedImage) -> ManifestEntry:
    """The manifest entry of an image's copy under a job."""
    return ManifestEntry(
        path=f"{JOB_CHARACTER_REFERENCE_DIR}/{image_id}.{image.kind.extension}",
        category=CHARACTER_REFERENCES_CATEGORY,
        size=len(image.data),
        sha256=image.sha256,
        content_type=image.kind.content_type,
    )


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


class CharacterReferences:
    """Stores standalone images with their sidecars, and finds them again."""

    def __init__(self, storage: StorageBackend, urls: AssetUrls) -> None:
        self.storage = storage
        self.urls = urls
        self.index = CharacterReferenceIndex(storage)
        # A miss is not remembered, so an image stored later (by another replica) is found.
        self._found: dict[str, FoundImage] = {}
        self._forgotten = 0  # how many times everything was forgotten (after deletes)
        self._found_lock = threading.Lock()

    async def store(
        self,
        image_id: str,
        image: PreparedImage,
        job_id: str | None,
        details: GenerationDetails | None,
    ) -> StoredCharacterReference:
        """Store the image and its sidecar (and a copy under `job_id`, if given)."""
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
        stored = await asyncio.gather(
            *(asyncio.to_thread(self.storage.put_bytes, *write) for write in writes)
        )
        # Listed once it is stored: a list never names an image that cannot be read.
        pending = any(result.pending for result in stored)
        await asyncio.to_thread(functools.partial(self.index.add, record, job_id, pending=pending))
        url = await self.urls.for_stored_key(key)
        return StoredCharacterReference(
            id=image_id,
            key=key,
            url=url,
            cloud_url=url if self.urls.is_presigned(key) else None,
            thumbnail_url=self.urls.thumbnail(key),
            kind=image.kind,
            sha256=image.sha256,
            size=len(image.data),
            job_entry=job_entry(image_id, image) if job_id is not None else None,
        )

    def read_record(self, image_id: str) -> CharacterReferenceRecord | None:
        """The sidecar of a standalone image, or None. Blocking."""
        return read_sidecar(self.storage, image_id)

    def find(self, image_id: str) -> FoundImage:
        """Key, expected sha256 and owner of a standalone image, from its sidecar (or, with no
        sidecar, by extension: no sha256, no owner); remembered once found.

        Blocking. CharacterReferenceNotFoundError when no image has this id.
        """
        found = self._found.get(image_id)
        if found is not None:
            return found
        forgotten = self._forgotten
        found = self._find(image_id)
        with self._found_lock:
            if self._forgotten == forgotten:  # else a delete came meanwhile: not remembered
                if len(self._found) >= MAX_REMEMBERED_LOCATIONS:
                    del self._found[next(iter(self._found))]  # the oldest
                self._found[image_id] = found
        return found

    def _find(self, image_id: str) -> FoundImage:
        record = self.read_record(image_id)
        if record is not None:
            extension = normalize_image_extension(record.content_type.rpartition("/")[2])
            key = character_reference_key(image_id, extension)
            if self.storage.exists(key):
                return FoundImage(key, record.sha256, record.owner)
        for extension in IMAGE_CONTENT_TYPES:
            key = character_reference_key(image_id, extension)
            if self.storage.exists(key):
                return FoundImage(key, None, None)
        raise CharacterReferenceNotFoundError(image_id)

    def find_visible(self, image_id: str, viewer: Principal) -> FoundImage:
        """`find`, for `viewer`: another owner's image is not found, as if it did not exist."""
        found = self.find(image_id)
        if not viewer.may_see(found.owner):
            raise CharacterReferenceNotFoundError(image_id)
        return found

    def forget_location(self, image_id: str) -> None:
        """Forget where `image_id` was found (it was deleted); a lookup under way when this is
        called is not remembered either."""
        with self._found_lock:
            self._forgotten += 1
            self._found.pop(image_id, None)

    def forget_locations(self) -> None:
        """Forget where every image was found (one was found gone)."""
        with self._found_lock:
            self._forgotten += 1
            self._found.clear()

"""How a stored character reference reaches a client: a presigned S3 URL, or local bytes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mv.ids import parse_image_id
from mv.principals import Principal
from services.asset_persistence.references import (
    CharacterReferenceNotFoundError,
    CharacterReferences,
    FoundImage,
)
from services.asset_persistence.thumbnails import ThumbnailStore
from services.storage import (
    HasLocalCopies,
    ObjectNotFoundError,
    PresignedUrl,
    SignsExistingKeys,
    StorageBackend,
    content_type_for,
)

# A presigned URL is handed out again while at least this share of its validity is left, so
# every client still gets at least 90 % of PRESIGNED_URL_EXPIRY.
REUSE_WHILE_VALIDITY_LEFT = 0.9
MAX_REMEMBERED_URLS = 65_536
# A URL worked out while its key was being deleted is not remembered: deleted keys are refused
# for this long, more than any lookup takes.
REFUSE_DELETED_FOR_SECONDS = 120.0


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LocalImageFile:
    """A local file to send, with the validator clients cache it by."""

    key: str
    path: Path
    content_type: str
    etag: str | None  # quoted sha256 (of the image a thumbnail is made from) when recorded


@dataclass(frozen=True, slots=True)
class CloudImage:
    """A presigned URL of the S3 copy."""

    key: str
    url: PresignedUrl
    content_type: str


class ImageDelivery:
    """Chooses cloud or local serving per request, falling back to the local copy."""

    def __init__(
        self,
        storage: StorageBackend,
        references: CharacterReferences,
        thumbnails: ThumbnailStore,
        *,
        serve_from_cloud: bool,
        presigned_url_expiry: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.references = references
        self.thumbnails = thumbnails
        self._files = storage if isinstance(storage, HasLocalCopies) else None
        self._signer = storage if isinstance(storage, SignsExistingKeys) else None
        self.serves_from_cloud = serve_from_cloud and self._signer is not None
        self._expiry = presigned_url_expiry
        self.clock = clock  # seconds since the epoch; a test can stop it
        self._recent_urls: dict[str, PresignedUrl] = {}
        # image id -> its cloud copy and its owner (checked on every use)
        self._recent_cloud_images: dict[str, tuple[CloudImage, str | None]] = {}
        self._deleted: dict[str, float] = {}  # key -> when it was forgotten
        self._remember_lock = threading.Lock()  # lookups finish on worker threads

    def _remember(self, memory: dict[str, _T], name: str, key: str, value: _T) -> bool:
        """Remember `value` under `name` unless `key` was deleted meanwhile; whether it was."""
        with self._remember_lock:
            deleted_at = self._deleted.get(key)
            if deleted_at is not None and self.clock() - deleted_at < REFUSE_DELETED_FOR_SECONDS:
                return False
            if len(memory) >= MAX_REMEMBERED_URLS:
                memory.clear()
            memory[name] = value
            return True

    def _mostly_valid(self, url: PresignedUrl) -> bool:
        left = url.expires_at.timestamp() - self.clock()
        return left >= REUSE_WHILE_VALIDITY_LEFT * url.expires_in

    def _presigned(self, key: str) -> PresignedUrl | None:
        """A presigned URL of `key`, the same one again while most of its validity is left:
        signing costs more than the rest of a redirect, and a repeated URL lets browsers and
        CDNs cache the image."""
        assert self._signer is not None
        recent = self._recent_urls.get(key)
        if recent is not None and self._mostly_valid(recent):
            return recent
        signed = self._signer.presign_existing(key, self._expiry)
        if signed is not None and not self._remember(self._recent_urls, key, key, signed):
            return None  # deleted while it was signed
        return signed

    async def locate(self, image_id: str, viewer: Principal) -> CloudImage | LocalImageFile:
        """The S3 copy's presigned URL when serving from the cloud and S3 holds it; else the
        local copy (fetched from S3 first if only S3 holds it).

        Raises CharacterReferenceNotFoundError when no tier holds the image, or when it is
        another owner's (`viewer` may not see it).
        """
        # Remembered under canonical ids only, so a hit is an id checked before.
        recent = self._recent_cloud_images.get(image_id)
        if recent is not None and self._mostly_valid(recent[0].url):
            if not viewer.may_see(recent[1]):
                raise CharacterReferenceNotFoundError(image_id)
            return recent[0]  # a repeated redirect needs neither a lookup nor a signature
        image_id = parse_image_id(image_id)
        # One hop for both steps.
        located, owner = await asyncio.to_thread(self._locate, image_id, viewer)
        if isinstance(located, CloudImage) and not self._remember(
            self._recent_cloud_images, image_id, located.key, (located, owner)
        ):
            raise CharacterReferenceNotFoundError(image_id)  # deleted while it was looked up
        return located

    def _locate(
        self, image_id: str, viewer: Principal
    ) -> tuple[CloudImage | LocalImageFile, str | None]:
        found = self.references.find_visible(image_id, viewer)
        missing = CharacterReferenceNotFoundError(image_id)
        return self._locate_key(found.key, found.sha256, missing), found.owner

    async def find(self, image_id: str, viewer: Principal) -> FoundImage:
        """Where a standalone image is; CharacterReferenceNotFoundError if absent or
        another owner's."""
        image_id = parse_image_id(image_id)
        return await asyncio.to_thread(self.references.find_visible, image_id, viewer)

    async def locate_thumbnail(
        self, image_key: str, image_sha256: str | None, size: int, not_found: ObjectNotFoundError
    ) -> CloudImage | LocalImageFile:
        """The `size`-px thumbnail of a stored image (made on first request), served like it.

        Its validator derives from the image's sha256: the rendering is deterministic.
        """
        try:
            key = await self.thumbnails.ensure(image_key, size)
        except ObjectNotFoundError:
            raise not_found from None
        validator = f"{image_sha256}-{size}" if image_sha256 else None
        return await self.locate_key(key, validator, not_found)

    def forget(self, keys: list[str]) -> None:
        """Drop what this replica remembers about deleted keys (URLs, thumbnails), and refuse
        to remember them for a while (lookups that began before the delete may still end)."""
        now = self.clock()
        deleted = set(keys)
        with self._remember_lock:
            for key in keys:
                self._deleted[key] = now
                self._recent_urls.pop(key, None)
            for image_id, (cloud, _) in list(self._recent_cloud_images.items()):
                if cloud.key in deleted:
                    del self._recent_cloud_images[image_id]
            horizon = now - REFUSE_DELETED_FOR_SECONDS
            self._deleted = {key: at for key, at in self._deleted.items() if at >= horizon}
        self.thumbnails.forget(keys)

    def forget_prefix(self, prefix: str) -> None:
        """`forget` every key under `prefix` that this replica remembers."""
        with self._remember_lock:
            keys = [key for key in self._recent_urls if key.startswith(prefix)]
        self.forget(keys + self.thumbnails.known_under(prefix))

    async def locate_key(
        self, key: str, sha256: str | None, not_found: ObjectNotFoundError
    ) -> CloudImage | LocalImageFile:
        """Like locate, for any stored key; raises `not_found` when no tier holds it."""
        return await asyncio.to_thread(self._locate_key, key, sha256, not_found)

    def _locate_key(
        self, key: str, sha256: str | None, not_found: ObjectNotFoundError
    ) -> CloudImage | LocalImageFile:
        content_type = content_type_for(key)
        if self.serves_from_cloud:
            signed = self._presigned(key)
            if signed is not None:
                return CloudImage(key, signed, content_type)
        path = None if self._files is None else self._files.local_copy(key)
        if path is None:
            raise not_found
        return LocalImageFile(key, path, content_type, f'"{sha256}"' if sha256 else None)

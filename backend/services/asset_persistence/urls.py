"""URLs of stored assets: presigned S3 URLs where the store signs and holds the key, else the
API path that serves it (prefixed by PUBLIC_BASE_URL, and signed when the API needs keys, so
that the URL works on its own in an <img src>)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from services.asset_persistence.signing import UrlSigner
from services.storage import (
    CHARACTER_REFERENCES_PREFIX,
    JOB_CHARACTER_REFERENCE_DIR,
    JOBS_PREFIX,
    THUMBNAIL_SIZES,
    HoldsPendingUploads,
    SignsKnownKeysWithoutIO,
    SignsUrls,
    StorageBackend,
)

API_PREFIX = "/api/mv"
DEFAULT_THUMBNAIL_SIZE = THUMBNAIL_SIZES[0]  # the `thumbnail_url` of replies


class LocalAssetUrls:
    """Builds API URLs for keys, prefixed by PUBLIC_BASE_URL when it is set, signed by
    `signer` when given."""

    def __init__(self, public_base_url: str | None = None, signer: UrlSigner | None = None) -> None:
        self._origin = (public_base_url or "").rstrip("/")
        self._signer = signer

    def for_path(self, path: str) -> str:
        """The URL of an API path (signed when a signer is set)."""
        if self._signer is not None:
            path = self._signer.sign(path)
        return self._origin + path

    def for_key(self, key: str) -> str:
        """The URL that serves `key` through the API."""
        return self.for_path(self.path_for_key(key))

    @staticmethod
    def path_for_key(key: str) -> str:
        """The API path that serves `key`."""
        parts = key.split("/")
        if parts[0] == CHARACTER_REFERENCES_PREFIX and len(parts) == 2:
            image_id, _, extension = parts[1].rpartition(".")
            if extension != "json":
                return f"{API_PREFIX}/get_character_reference/{image_id}"
        if parts[0] == JOBS_PREFIX and len(parts) >= 3:
            job_id, rest = parts[1], parts[2:]
            if rest[0] == JOB_CHARACTER_REFERENCE_DIR and len(rest) == 2:
                image_id = rest[1].rpartition(".")[0]
                return f"{API_PREFIX}/jobs/{job_id}/character_references/{image_id}"
            return f"{API_PREFIX}/jobs/{job_id}/assets/{quote('/'.join(rest))}"
        return f"{API_PREFIX}/assets/{quote(key)}"

    @staticmethod
    def thumbnail_path(image_key: str, size: int) -> str:
        """The API path that serves the thumbnail of the image stored under `image_key`."""
        image_path = LocalAssetUrls.path_for_key(image_key)
        if image_path.startswith(f"{API_PREFIX}/get_character_reference/"):
            image_id = image_path.rpartition("/")[2]
            return f"{API_PREFIX}/character_references/{image_id}/thumbnail/{size}"
        if f"/{JOB_CHARACTER_REFERENCE_DIR}/" in image_key:
            return f"{image_path}/thumbnail/{size}"
        raise ValueError(f"only character references have thumbnails, not {image_key}")


class AssetUrls:
    """The URL of any stored key: presigned in S3 mode (once the upload is done), else local."""

    def __init__(
        self, storage: StorageBackend, local: LocalAssetUrls, presigned_url_expiry: int
    ) -> None:
        self.storage = storage
        self.local = local
        self.presigned_url_expiry = presigned_url_expiry
        # Capabilities are fixed per backend: check them once, not per URL.
        self._signer = storage if isinstance(storage, SignsUrls) else None
        self._pending = storage if isinstance(storage, HoldsPendingUploads) else None
        self._inline_signer = storage if isinstance(storage, SignsKnownKeysWithoutIO) else None

    def is_presigned(self, key: str) -> bool:
        """Whether for_key(key) gives a presigned URL (S3 mode, upload not pending)."""
        pending = self._pending is not None and self._pending.is_pending(key)
        return self._signer is not None and not pending

    def for_key(self, key: str) -> str:
        """URL of a stored key: presigned when the store signs (and holds it), else the API path.

        Blocking (presigning may refresh credentials): call it off the event loop.
        """
        if self._signer is not None and self.is_presigned(key):
            return self._signer.presign(key, self.presigned_url_expiry).url
        # Local mode, or an upload still pending: the API serves the local copy.
        return self.local.for_key(key)

    def inline(self, key: str) -> str | None:
        """A presigned URL computed on the caller's thread, or None when that would need I/O.

        A key known to be in S3, with credentials that need no refresh, is pure computation,
        cheaper than the hop to a worker thread.
        """
        if self._inline_signer is None:
            return None
        signed = self._inline_signer.presign_known(key, self.presigned_url_expiry)
        return None if signed is None else signed.url

    async def for_stored_key(self, key: str) -> str:
        """URL of a key just written."""
        return self.inline(key) or await asyncio.to_thread(self.for_key, key)

    def if_exists(self, key: str) -> str | None:
        """URL of `key`, or None when nothing is stored under it. Blocking."""
        return self.for_key(key) if self.storage.exists(key) else None

    def thumbnail(self, image_key: str, size: int = DEFAULT_THUMBNAIL_SIZE) -> str:
        """URL of the thumbnail of a stored character reference (made on first request)."""
        return self.local.for_path(self.local.thumbnail_path(image_key, size))

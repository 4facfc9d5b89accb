"""Local-mode URLs: each stored key maps to the API route that serves it (signed when the
API needs keys, so that the URL works on its own)."""

from __future__ import annotations

from urllib.parse import quote

from services.storage.keys import (
    CHARACTER_REFERENCES_PREFIX,
    JOB_CHARACTER_REFERENCE_DIR,
    JOBS_PREFIX,
)
from services.url_signing import UrlSigner

API_PREFIX = "/api/mv"


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

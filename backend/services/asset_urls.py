"""Local-mode URLs: each stored key maps to the API route that serves it."""

from __future__ import annotations

from urllib.parse import quote

from services.storage.keys import (
    CHARACTER_REFERENCES_PREFIX,
    JOB_CHARACTER_REFERENCE_DIR,
    JOBS_PREFIX,
)

API_PREFIX = "/api/mv"


class LocalAssetUrls:
    """Builds API URLs for keys, prefixed by PUBLIC_BASE_URL when it is set."""

    def __init__(self, public_base_url: str | None = None) -> None:
        self._base = (public_base_url or "").rstrip("/") + API_PREFIX

    def for_key(self, key: str) -> str:
        """The URL that serves `key` through the API."""
        parts = key.split("/")
        if parts[0] == CHARACTER_REFERENCES_PREFIX and len(parts) == 2:
            image_id, _, extension = parts[1].rpartition(".")
            if extension != "json":
                return f"{self._base}/get_character_reference/{image_id}"
        if parts[0] == JOBS_PREFIX and len(parts) >= 3:
            job_id, rest = parts[1], parts[2:]
            if rest[0] == JOB_CHARACTER_REFERENCE_DIR and len(rest) == 2:
                image_id = rest[1].rpartition(".")[0]
                return f"{self._base}/jobs/{job_id}/character_references/{image_id}"
            return f"{self._base}/jobs/{job_id}/assets/{quote('/'.join(rest))}"
        return f"{self._base}/assets/{quote(key)}"

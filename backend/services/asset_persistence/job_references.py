"""Standalone character references given to a job: copied under `jobs/{job_id}/` (and, for a
worker, into its job directory), so the job keeps them whatever happens to the originals.

Every id is resolved before anything is copied, so an unknown one fails the whole call.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mv.principals import Principal
from services.asset_persistence.manifests import JobManifests
from services.asset_persistence.records import CHARACTER_REFERENCES_CATEGORY, ManifestEntry
from services.asset_persistence.references import CharacterReferences
from services.asset_persistence.urls import AssetUrls
from services.storage import (
    IMAGE_CONTENT_TYPES,
    JOB_CHARACTER_REFERENCE_DIR,
    IntegrityError,
    StorageBackend,
    job_asset_key,
    job_character_reference_key,
)


class JobReferences:
    """Copies stored character references under jobs. Methods block."""

    def __init__(
        self,
        storage: StorageBackend,
        references: CharacterReferences,
        manifests: JobManifests,
        urls: AssetUrls,
    ) -> None:
        self.storage = storage
        self.references = references
        self.manifests = manifests
        self.urls = urls

    def copy_to_directory(self, job_id: str, image_ids: list[str], base: Path) -> list[str]:
        """Copy each image into `base/character_reference/` and under the job; their URLs."""
        found = [self.references.find(image_id) for image_id in image_ids]
        urls = []
        for image_id, image in zip(image_ids, found, strict=True):
            key, sha256 = image.key, image.sha256
            extension = key.rpartition(".")[2]
            local_copy = base / JOB_CHARACTER_REFERENCE_DIR / f"{image_id}.{extension}"
            self.storage.download(key, local_copy, sha256)
            job_key = job_character_reference_key(job_id, image_id, extension)
            self.storage.put_file(job_key, local_copy, IMAGE_CONTENT_TYPES[extension])
            self._list_in_job(image_id, job_id)
            urls.append(self.urls.for_key(job_key))
        return urls

    def _list_in_job(self, image_id: str, job_id: str) -> None:
        """Enter the image in its owner's list of the job's images (when it has a sidecar)."""
        record = self.references.read_record(image_id)
        if record is not None:
            self.references.index.add_to_job(record, job_id)

    def copy_into_job(
        self, job_id: str, image_ids: list[str], viewer: Principal
    ) -> list[ManifestEntry]:
        """Copy each image `viewer` may see under the job (unless its manifest lists it
        already, unchanged); the manifest entries to merge."""
        found = [self.references.find_visible(image_id, viewer) for image_id in image_ids]
        manifest = self.manifests.read_or_none(job_id)
        listed = {entry.path: entry for entry in manifest.files} if manifest else {}
        entries = []
        for image_id, image in zip(image_ids, found, strict=True):
            key, sha256 = image.key, image.sha256
            extension = key.rpartition(".")[2]
            relative = f"{JOB_CHARACTER_REFERENCE_DIR}/{image_id}.{extension}"
            earlier = listed.get(relative)
            self._list_in_job(image_id, job_id)
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

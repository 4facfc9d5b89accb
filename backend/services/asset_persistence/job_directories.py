"""Job directories: a worker's whole job folder stored under `jobs/{job_id}/`, and restored.

Files are grouped by top-level folder (`character_reference/` is the character references
category); every file is hashed on the way up and checked against its sha256 on the way down,
and written atomically, so a corrupted object leaves no partial file behind.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from services.asset_persistence.manifests import JobManifests
from services.asset_persistence.records import CHARACTER_REFERENCES_CATEGORY, ManifestEntry
from services.asset_persistence.urls import AssetUrls
from services.storage import (
    JOB_CHARACTER_REFERENCE_DIR,
    MANIFEST_NAME,
    InvalidKeyError,
    StorageBackend,
    content_type_for,
    is_temp_file,
    job_asset_key,
    job_manifest_key,
    sha256_file,
    validate_key,
)

logger = logging.getLogger(__name__)

TOP_LEVEL_FILES_CATEGORY = "files"
_RESERVED_CATEGORIES = {"manifest"}

JobUrls = dict[str, list[str] | str]


@dataclass(frozen=True, slots=True)
class _JobFile:
    relative_path: str
    path: Path
    category: str


def _category_of(relative_path: str) -> str:
    head, _, rest = relative_path.partition("/")
    if not rest:
        return TOP_LEVEL_FILES_CATEGORY
    return CHARACTER_REFERENCES_CATEGORY if head == JOB_CHARACTER_REFERENCE_DIR else head


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


def _same_file_content(path: Path, entry: ManifestEntry) -> bool:
    """Whether `path` already holds exactly the manifest entry's bytes."""
    try:
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
    except OSError:
        return False
    return sha256_file(path)[0] == entry.sha256


class JobDirectories:
    """Uploads and downloads job directories, many files at once. Methods block."""

    def __init__(
        self,
        storage: StorageBackend,
        manifests: JobManifests,
        urls: AssetUrls,
        max_workers: int,
    ) -> None:
        self.storage = storage
        self.manifests = manifests
        self.urls = urls
        self._max_workers = max_workers

    def upload(self, job_id: str, base: Path) -> list[ManifestEntry]:
        """Store every file under `base` (recursively); their manifest entries."""
        files = _job_files(base)

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

    def urls_by_category(self, job_id: str, entries: list[ManifestEntry]) -> JobUrls:
        """{"character_references": [urls], <category>: [urls]..., "manifest": url}."""
        result: JobUrls = {CHARACTER_REFERENCES_CATEGORY: []}
        for entry in entries:
            urls = result.setdefault(entry.category, [])
            assert isinstance(urls, list)
            urls.append(self.urls.for_key(job_asset_key(job_id, entry.path)))
        result["manifest"] = self.urls.for_key(job_manifest_key(job_id))
        return result

    def download(self, job_id: str, base: Path) -> list[str]:
        """Restore the files the manifest lists under `base`, each checked against its sha256;
        files already there with the right content are left alone. The local paths, in
        manifest order."""
        manifest = self.manifests.read(job_id)

        def fetch(entry: ManifestEntry) -> str:
            destination = base.joinpath(*entry.path.split("/"))
            if not _same_file_content(destination, entry):
                key = job_asset_key(job_id, entry.path)
                self.storage.download(key, destination, entry.sha256)
            return str(destination)

        base.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self._max_workers, thread_name_prefix="job-download") as pool:
            return list(pool.map(fetch, manifest.files))

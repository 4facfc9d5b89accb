"""Job manifests: every file of a job, listed in `jobs/{job_id}/manifest.json`.

Many writers list files in one manifest (the API attaching images, generations with a
`job_id`, workers persisting their directories, on any replica), so a change is a merge
applied by compare-and-swap: read with its version, merge, write only if still unchanged,
and retry when another writer got in first. Merges commute for distinct paths, which is what
lets replicas apply them in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from services.asset_persistence.records import JobManifest, ManifestEntry
from services.storage import (
    HoldsPendingUploads,
    Merge,
    ObjectNotFoundError,
    StorageBackend,
    StorageError,
    StorageUnavailableError,
    job_manifest_key,
    parse_job_manifest_key,
    read_latest,
    update_object,
)

logger = logging.getLogger(__name__)


class JobNotFoundError(ObjectNotFoundError):
    """No such job (for the Python API: no manifest is stored for it)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} not found")
        self.job_id = job_id


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


def parse_manifest(job_id: str, raw: bytes) -> JobManifest:
    """A stored manifest, checked to be the one of `job_id`."""
    manifest = JobManifest.model_validate_json(raw)
    if manifest.job_id != job_id:
        raise StorageError(f"manifest of job {job_id} names job {manifest.job_id}")
    return manifest


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


class JobManifests:
    """Reads job manifests and merges files into them, safe against every other writer."""

    def __init__(
        self, storage: StorageBackend, on_conflict: Callable[[int], None] | None = None
    ) -> None:
        self.storage = storage
        # Told how many times another writer got to a job manifest first, per merge.
        self._on_conflict = on_conflict
        self._pending = storage if isinstance(storage, HoldsPendingUploads) else None
        # Weak: a job's lock lives only while someone holds or waits for it.
        self._job_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    @contextlib.asynccontextmanager
    async def job_lock(self, job_id: str) -> AsyncIterator[None]:
        """One manifest update per job at a time in this process."""
        lock = self._job_locks.get(job_id)
        if lock is None:
            lock = self._job_locks[job_id] = asyncio.Lock()
        async with lock:
            yield

    async def add(self, job_id: str, entries: Sequence[ManifestEntry]) -> JobManifest:
        """List files already stored under a job in its manifest; the manifest afterwards."""
        async with self.job_lock(job_id):  # writers in this process queue instead of colliding
            return await asyncio.to_thread(self._merge, job_id, list(entries))

    def _merge(self, job_id: str, entries: list[ManifestEntry]) -> JobManifest:
        key = job_manifest_key(job_id)

        def change(raw: bytes | None) -> bytes | None:
            current = None if raw is None else parse_manifest(job_id, raw)
            merged = merge_manifest(current, job_id, entries)
            return None if merged is None else merged.model_dump_json(indent=2).encode()

        try:
            updated = update_object(self.storage, key, change)
        except StorageUnavailableError:
            if self._pending is None:
                raise
            return self._merge_locally(job_id, entries)
        if updated.conflicts and self._on_conflict is not None:
            self._on_conflict(updated.conflicts)
        assert updated.data is not None  # a merge always leaves a manifest
        return parse_manifest(job_id, updated.data)

    def _merge_locally(self, job_id: str, entries: list[ManifestEntry]) -> JobManifest:
        """The arbiter is unreachable: merge into the local copy, held as a pending upload.

        When the store is back, the pending copy is merged into whatever the store holds then
        (see `merger_for`), so nothing another replica wrote meanwhile is replaced.
        """
        assert self._pending is not None
        key = job_manifest_key(job_id)
        try:
            current = parse_manifest(job_id, self.storage.get_bytes(key))
        except (ObjectNotFoundError, StorageUnavailableError):
            current = None  # nothing known here: the later merge adds what the store has
        merged = merge_manifest(current, job_id, entries) or current
        assert merged is not None
        self._pending.hold(key, merged.model_dump_json(indent=2).encode(), "application/json")
        logger.warning("job %s: store unreachable, manifest kept locally until it is back", job_id)
        return merged

    def read(self, job_id: str) -> JobManifest:
        """The manifest as the arbitrating tier holds it (another replica may have changed it).

        Blocking; JobNotFoundError if there is none.
        """
        try:
            raw = read_latest(self.storage, job_manifest_key(job_id))
        except ObjectNotFoundError:
            raise JobNotFoundError(job_id) from None
        return parse_manifest(job_id, raw)

    def read_or_none(self, job_id: str) -> JobManifest | None:
        """The manifest, or None when the job has none. Blocking."""
        try:
            return self.read(job_id)
        except JobNotFoundError:
            return None

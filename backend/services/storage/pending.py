"""Pending uploads: writes kept locally until the remote tier accepts them, surviving restarts."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.storage.atomic import write_bytes_atomic


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """One key waiting for an upload, and why the last attempt failed."""

    key: str
    content_type: str
    since: str
    attempts: int
    last_error: str

    @property
    def since_timestamp(self) -> float:
        """When the key was first held, in seconds since the epoch."""
        return datetime.fromisoformat(self.since).timestamp()


class PendingUploads:
    """A thread-safe set of pending keys, each also recorded as a small JSON file."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._records: dict[str, PendingUpload] = {}
        if directory.is_dir():
            for path in directory.glob("*.json"):
                try:
                    record = PendingUpload(**json.loads(path.read_text("utf-8")))
                except (ValueError, TypeError):
                    continue  # a damaged record: its file is still in the local tier
                self._records[record.key] = record

    def _path(self, key: str) -> Path:
        return self._directory / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def add(self, key: str, content_type: str, error: str) -> PendingUpload:
        """Record (or update) a failed upload of `key`."""
        with self._lock:
            previous = self._records.get(key)
            record = PendingUpload(
                key=key,
                content_type=content_type,
                since=previous.since if previous else datetime.now(UTC).isoformat(),
                attempts=(previous.attempts if previous else 0) + 1,
                last_error=error,
            )
            write_bytes_atomic(self._path(key), json.dumps(asdict(record)).encode())
            self._records[key] = record
            return record

    def remove(self, key: str) -> None:
        """Forget `key` (uploaded or deleted)."""
        with self._lock:
            if self._records.pop(key, None) is not None:
                self._path(key).unlink(missing_ok=True)

    def get(self, key: str) -> PendingUpload | None:
        """The pending upload of `key`, if there is one."""
        return self._records.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def records(self) -> list[PendingUpload]:
        """A snapshot of all pending uploads."""
        with self._lock:
            return list(self._records.values())

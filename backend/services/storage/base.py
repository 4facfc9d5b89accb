"""The storage interface: small protocols speaking in keys, bytes and URLs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a store knows about one object."""

    key: str
    size: int
    content_type: str
    sha256: str | None  # None only for objects written by other tools without a checksum


@dataclass(frozen=True, slots=True)
class StoredObject:
    """The result of a write; `pending` means it is held locally until an upload succeeds."""

    info: ObjectInfo
    pending: bool = False


@dataclass(frozen=True, slots=True)
class VersionedObject:
    """An object's bytes and the version a conditional replace must name (ETag or checksum)."""

    data: bytes
    version: str


@dataclass(frozen=True, slots=True)
class PresignedUrl:
    """A time-limited GET URL."""

    url: str
    expires_in: int
    expires_at: datetime


@runtime_checkable
class StorageBackend(Protocol):
    """Stores, reads, lists and deletes objects by key. Methods block: call them off the loop."""

    name: str

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store `data` under `key` atomically."""
        ...

    def put_file(self, key: str, source: Path, content_type: str) -> StoredObject:
        """Store the file at `source` under `key` atomically; FileNotFoundError if missing."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; ObjectNotFoundError if absent."""
        ...

    def download(
        self, key: str, destination: Path, expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Write the object to `destination` atomically, verifying its SHA-256 when given."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """Size, content type and SHA-256 of an object; ObjectNotFoundError if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """All keys under `prefix` (recursively), sorted."""
        ...

    def list_page(self, prefix: str, start_after: str, limit: int) -> list[str]:
        """At most `limit` keys under `prefix` that sort after `start_after`, sorted: one page
        of a listing, one request whatever the number of keys (S3 `StartAfter`)."""
        ...

    # Conditional writes: how records shared between processes and replicas are changed.
    # They go to the tier that arbitrates (S3 when configured) and never wait as pending.

    def get_versioned(self, key: str) -> VersionedObject:
        """Current bytes and version from the arbitrating tier; ObjectNotFoundError if absent."""
        ...

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str:
        """Create `key` unless it exists; return the new version. PreconditionFailedError if it
        exists."""
        ...

    def put_if_match(self, key: str, data: bytes, content_type: str, version: str) -> str:
        """Replace `key` only if it still has `version`; return the new version.
        PreconditionFailedError if it changed or is gone."""
        ...

    def close(self) -> None:
        """Release connections and worker threads."""
        ...


@runtime_checkable
class SignsUrls(Protocol):
    """A store that can hand out presigned GET URLs."""

    def presign(self, key: str, expires_in: int) -> PresignedUrl:
        """A GET URL for `key` valid for `expires_in` seconds."""
        ...


@runtime_checkable
class SignsKnownKeysWithoutIO(Protocol):
    """A store that can presign keys it knows to exist without touching disk or network."""

    def presign_known(self, key: str, expires_in: int) -> PresignedUrl | None:
        """A URL, or None when answering would need I/O (unknown key, credential refresh)."""
        ...


# (the pending local bytes, the remote object's bytes) -> the bytes to store instead.
Merge = Callable[[bytes, bytes], bytes]
# A key -> how to merge a pending copy of it into another writer's, or None (theirs stands).
MergerFor = Callable[[str], Merge | None]


@runtime_checkable
class HoldsPendingUploads(Protocol):
    """A tiered store that keeps writes locally until the remote tier accepts them."""

    def is_pending(self, key: str) -> bool:
        """Whether `key` is stored locally only, waiting for an upload."""
        ...

    def pending_keys(self) -> Iterable[str]:
        """Keys waiting for an upload."""
        ...

    def hold(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store locally only, as a pending upload (the remote tier cannot be reached)."""
        ...

    def retry_pending(self, merger_for: MergerFor | None = None) -> list[str]:
        """Try every pending upload once; return the keys uploaded.

        An upload never replaces an object another writer stored meanwhile: for such a key,
        `merger_for(key)` may combine the two (else the remote object stays as it is).
        """
        ...


@runtime_checkable
class HasLocalCopies(Protocol):
    """A store with files on this machine's disk, which the API can serve directly."""

    def local_copy(self, key: str) -> Path | None:
        """The local file holding `key` (fetched into the local tier if needed), or None."""
        ...


@runtime_checkable
class CachesSharedObjects(StorageBackend, HoldsPendingUploads, Protocol):
    """A tiered store whose local tier caches a remote one that other replicas write too."""

    @property
    def remote(self) -> StorageBackend:
        """The shared tier."""
        ...

    @property
    def state_dir(self) -> Path:
        """Where this machine keeps its own records about the shared tier."""
        ...

    def pending_since(self, key: str) -> float | None:
        """When the pending upload of `key` was first held (seconds since the epoch), or None."""
        ...

    def cached_keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` that this machine holds: local copies and pending uploads."""
        ...

    def evict(self, key: str, deleted_at: float) -> None:
        """Forget `key`, deleted by another replica at `deleted_at` (seconds since the epoch):
        its local copy and what is remembered of it, and a pending upload older than that."""
        ...


@runtime_checkable
class SignsExistingKeys(Protocol):
    """A store that can presign a key after checking that its remote copy exists."""

    def presign_existing(self, key: str, expires_in: int) -> PresignedUrl | None:
        """A URL when the remote copy exists; None when it is missing or the store is down."""
        ...


@runtime_checkable
class ChecksHealth(Protocol):
    """A store that can tell whether it is reachable and usable."""

    def check(self) -> None:
        """Raise a StorageError unless the store answers."""
        ...

"""LocalStorageBackend: objects as files under one root directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import mimetypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from echo import shown
from mv.ids import InvalidKeyError
from services.storage.atomic import CHUNK_SIZE, atomic_writer, is_temp_file, sha256_file
from services.storage.base import ObjectInfo, StoredObject, VersionedObject
from services.storage.errors import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
)
from services.storage.keys import validate_key

_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",
}
# Conditional replaces lock one of a fixed set of files (chosen by the key's hash), so the
# lock files never grow with the number of keys; two keys sharing one only wait for each other.
LOCK_DIR = ".storage/locks"
LOCK_STRIPES = 256


def content_type_for(key: str) -> str:
    """Content type implied by a key's extension (local files carry no other)."""
    suffix = Path(key).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(key, strict=False)
    return guessed or "application/octet-stream"


class LocalStorageBackend:
    """Stores each key at `root/key`; writes are atomic and keys cannot leave the root."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._root_str = str(self.root)

    def path_for(self, key: str) -> Path:
        """The file that holds `key`; raises InvalidKeyError if it would leave the root."""
        validate_key(key)
        current = self._root_str
        # The root is resolved already, so only a symlink planted below it could lead
        # outside; lstat-ing the key's few components is far cheaper than resolve().
        for part in key.split("/"):
            current = os.path.join(current, part)  # noqa: PTH118 - str paths: hot path
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break  # nothing exists deeper, so nothing deeper is a link
            if stat.S_ISLNK(mode) and not Path(current).resolve().is_relative_to(self.root):
                raise InvalidKeyError(f"storage key escapes the storage root: {shown(key)}")
        return Path(self._root_str, key)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Write `data` under `key` atomically."""
        path = self.path_for(key)
        with atomic_writer(path) as handle:
            handle.write(data)
        info = ObjectInfo(key, len(data), content_type_for(key), hashlib.sha256(data).hexdigest())
        return StoredObject(info)

    def put_file(self, key: str, source: Path, content_type: str) -> StoredObject:
        """Copy `source` under `key` atomically, hashing while copying."""
        path = self.path_for(key)
        digest = hashlib.sha256()
        size = 0
        with Path(source).open("rb") as reader, atomic_writer(path) as writer:
            while chunk := reader.read(CHUNK_SIZE):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        return StoredObject(ObjectInfo(key, size, content_type_for(key), digest.hexdigest()))

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object."""
        try:
            return self.path_for(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None

    def download(
        self, key: str, destination: Path, expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Copy the object to `destination` atomically, checking its SHA-256 when given."""
        source = self.path_for(key)
        digest = hashlib.sha256()
        size = 0
        try:
            reader = source.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        with reader, atomic_writer(Path(destination)) as writer:
            while chunk := reader.read(CHUNK_SIZE):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise IntegrityError(key, expected_sha256, actual)  # the writer discards its file
        return ObjectInfo(key, size, content_type_for(key), actual)

    # ------------------------------------------------------- conditional writes
    # Safe across processes sharing the root: a create publishes with a hard link, which
    # fails if the key exists; a replace compares the stored checksum and renames while
    # holding an advisory lock that every conditional replace of the key takes.

    def get_versioned(self, key: str) -> VersionedObject:
        """The file's bytes; its version is their SHA-256."""
        data = self.get_bytes(key)
        return VersionedObject(data, hashlib.sha256(data).hexdigest())

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str:
        """Create the file unless it exists (PreconditionFailedError); return its version."""
        path = self.path_for(key)
        try:
            with atomic_writer(path, exclusive=True) as handle:
                handle.write(data)
        except FileExistsError:
            raise PreconditionFailedError(key, f"{shown(key)} exists already") from None
        return hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, content_type: str, version: str) -> str:
        """Replace the file if its SHA-256 is still `version` (PreconditionFailedError if not)."""
        path = self.path_for(key)
        with self._replace_lock(key):
            try:
                current, _ = sha256_file(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise PreconditionFailedError(key, f"{shown(key)} is gone") from None
            if current != version:
                raise PreconditionFailedError(key)
            with atomic_writer(path) as handle:
                handle.write(data)
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _replace_lock(self, key: str) -> Iterator[None]:
        stripe = hashlib.sha256(key.encode()).digest()[0] % LOCK_STRIPES
        path = self.root / LOCK_DIR / f"{stripe:03d}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock conflicts between separate open()s, so threads of one process exclude
            # each other as well as other processes.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    # ------------------------------------------------------------------ reads

    def local_copy(self, key: str) -> Path | None:
        """The file holding `key`, or None."""
        path = self.path_for(key)
        return path if path.is_file() else None

    def exists(self, key: str) -> bool:
        """Whether a file holds `key`."""
        return self.path_for(key).is_file()

    def head(self, key: str) -> ObjectInfo:
        """Size, content type and SHA-256 (computed from the file)."""
        path = self.path_for(key)
        if not path.is_file():
            raise ObjectNotFoundError(key)
        sha256, size = sha256_file(path)
        return ObjectInfo(key, size, content_type_for(key), sha256)

    def delete(self, key: str) -> None:
        """Remove the file; a missing one is fine."""
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            raise StorageError(f"{shown(key)} is a directory, not an object") from None

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of all files under `prefix`, skipping unfinished writes and symlinks."""
        base = self.path_for(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix.rstrip("/")]
        keys = []
        for directory, dirnames, filenames in os.walk(base):
            here = Path(directory)
            if here == self.root:
                dirnames[:] = [name for name in dirnames if not name.startswith(".")]
            for filename in filenames:
                path = here / filename
                if is_temp_file(path) or path.is_symlink():
                    continue
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def list_page(self, prefix: str, start_after: str, limit: int) -> list[str]:
        """At most `limit` keys under `prefix` after `start_after`, sorted.

        One directory walk that keeps only the smallest keys (no stat per file), so a page of
        a folder with many thousands of entries takes milliseconds.
        """
        base = self.path_for(prefix.rstrip("/")) if prefix.strip("/") else self.root
        folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        return heapq.nsmallest(limit, self._keys_after(base, folder, start_after))

    def _keys_after(self, base: Path, folder: str, start_after: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if base == self.root and entry.name.startswith("."):
                continue
            key = folder + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._keys_after(Path(entry.path), key + "/", start_after)
            elif (
                key > start_after
                and entry.is_file(follow_symlinks=False)
                and not is_temp_file(Path(entry.path))
            ):
                yield key

    def check(self) -> None:
        """Raise a StorageError unless the root directory exists (or can be made), writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {self.root}: {error.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root} is not writable")

    def close(self) -> None:
        """Nothing to release."""

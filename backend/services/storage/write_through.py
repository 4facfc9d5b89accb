"""WriteThroughStorageBackend: S3 as the durable tier, local disk as cache and fallback."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from services.storage.base import (
    Merge,
    MergerFor,
    ObjectInfo,
    PresignedUrl,
    StoredObject,
    VersionedObject,
)
from services.storage.conditional import update_object
from services.storage.errors import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
)
from services.storage.local import LocalStorageBackend
from services.storage.pending import PendingUploads
from services.storage.s3 import S3StorageBackend

logger = logging.getLogger(__name__)
STATE_DIR = ".storage"
PENDING_DIR = f"{STATE_DIR}/pending"
MAX_REMEMBERED_DELETES = 10_000


class KnownKeys:
    """A bounded set of keys known to be stored (oldest forgotten first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._keys: dict[str, None] = {}
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        """Remember `key`."""
        with self._lock:
            self._keys[key] = None
            if len(self._keys) > self._capacity:
                del self._keys[next(iter(self._keys))]

    def discard(self, key: str) -> None:
        """Forget `key`."""
        with self._lock:
            self._keys.pop(key, None)

    def under(self, prefix: str) -> list[str]:
        """The remembered keys under `prefix`."""
        with self._lock:
            return [key for key in self._keys if key.startswith(prefix)]

    def __contains__(self, key: object) -> bool:
        return key in self._keys


class WriteThroughStorageBackend:
    """Every write lands on local disk and in S3; a failed upload stays pending, never lost.

    The local copy is written alongside the upload (not after it) and always kept: it serves
    reads without a round trip and is what a pending upload is retried from. S3 arbitrates
    between replicas: conditional writes and versioned reads go to it, and a pending upload
    never replaces an object another replica stored in the meantime.
    """

    name = "s3"

    def __init__(
        self, local: LocalStorageBackend, remote: S3StorageBackend, *, max_workers: int = 8
    ) -> None:
        self.local = local
        self.remote = remote
        self.pending = PendingUploads(local.root / PENDING_DIR)
        self.known = KnownKeys()
        # How many deletes each key has seen (recent keys only): a fetch from S3 that a delete
        # overtook must not leave its now stale copy in the local tier.
        self._deletes: dict[str, int] = {}
        self._deletes_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="storage-upload")

    @property
    def bucket(self) -> str:
        """The remote bucket."""
        return self.remote.bucket

    def _write_both(
        self,
        key: str,
        content_type: str,
        write_local: Callable[[], StoredObject],
        upload: Callable[[], StoredObject],
    ) -> StoredObject:
        self.local.path_for(key)  # validates the key before anything is sent
        upload_future: Future[StoredObject] = self._pool.submit(upload)
        try:
            stored = write_local()
        except OSError as local_error:
            # S3 is the durable tier: if it took the object, a failed cache write is no loss.
            try:
                uploaded = upload_future.result()
            except Exception:
                raise local_error from None
            logger.warning("stored %s in S3 but not locally: %s", key, local_error)
            self.known.add(key)
            return uploaded
        try:
            upload_future.result()
        except StorageError as error:
            self.known.discard(key)
            record = self.pending.add(key, content_type, str(error))
            logger.warning(
                "upload of %s failed (attempt %d), kept locally: %s", key, record.attempts, error
            )
            return StoredObject(stored.info, pending=True)
        self.pending.remove(key)
        self.known.add(key)
        return stored

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Write locally and upload at the same time."""
        return self._write_both(
            key,
            content_type,
            lambda: self.local.put_bytes(key, data, content_type),
            lambda: self.remote.put_bytes(key, data, content_type),
        )

    def put_file(self, key: str, source: Path, content_type: str) -> StoredObject:
        """Copy locally and upload at the same time."""
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"no such file: {source}")
        return self._write_both(
            key,
            content_type,
            lambda: self.local.put_file(key, source, content_type),
            lambda: self.remote.put_file(key, source, content_type),
        )

    def get_bytes(self, key: str) -> bytes:
        """Local copy if present, else S3 (and keep a local copy)."""
        try:
            return self.local.get_bytes(key)
        except ObjectNotFoundError:
            pass
        deletes = self._deletes.get(key)
        data = self.remote.get_bytes(key)
        self._cache(key, data)
        self._drop_if_deleted_since(key, deletes)
        return data

    def _cache(self, key: str, data: bytes) -> None:
        try:
            self.local.put_bytes(key, data, "application/octet-stream")
        except OSError as error:  # the cache is an optimisation; a full disk must not fail reads
            logger.warning("could not cache %s locally: %s", key, error)

    def _drop_if_deleted_since(self, key: str, deletes: int | None) -> bool:
        """Remove the local copy just fetched if `key` was deleted while it was fetched."""
        if self._deletes.get(key) == deletes:
            return False
        self.local.delete(key)
        return True

    def download(
        self, key: str, destination: Path, expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Copy from the local tier when it holds good bytes, else from S3."""
        try:
            return self.local.download(key, destination, expected_sha256)
        except ObjectNotFoundError:
            pass
        except IntegrityError as error:
            logger.warning("local copy of %s is damaged, fetching from S3: %s", key, error)
        return self.remote.download(key, destination, expected_sha256)

    def exists(self, key: str) -> bool:
        """True when either tier holds the key (the local check needs no request)."""
        if self.local.exists(key):
            return True
        if not self.remote.exists(key):
            return False
        self.known.add(key)  # S3 itself said so
        return True

    def head(self, key: str) -> ObjectInfo:
        """Metadata from S3, or from the local copy when only that exists."""
        try:
            return self.remote.head(key)
        except ObjectNotFoundError:
            return self.local.head(key)
        except StorageError:
            if self.local.exists(key):
                return self.local.head(key)
            raise

    # ------------------------------------------------------- conditional writes

    def get_versioned(self, key: str) -> VersionedObject:
        """The object and its ETag from S3, the arbiter (another replica may have changed it)."""
        return self.remote.get_versioned(key)

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str:
        """Create in S3 unless the key exists there; then refresh the local copy."""
        self.local.path_for(key)  # validates the key before anything is sent
        version = self.remote.put_if_absent(key, data, content_type)
        self._keep_local_copy(key, data, content_type)
        return version

    def put_if_match(self, key: str, data: bytes, content_type: str, version: str) -> str:
        """Replace in S3 if its ETag is still `version`; then refresh the local copy."""
        self.local.path_for(key)
        new_version = self.remote.put_if_match(key, data, content_type, version)
        self._keep_local_copy(key, data, content_type)
        return new_version

    def _keep_local_copy(self, key: str, data: bytes, content_type: str) -> None:
        self.known.add(key)
        if key in self.pending:
            return  # the local copy holds writes S3 has not seen yet: retry_pending merges them
        try:
            self.local.put_bytes(key, data, content_type)
        except OSError as error:  # S3 took it: a failed cache write is no loss
            logger.warning("stored %s in S3 but not locally: %s", key, error)

    def delete(self, key: str) -> None:
        """Delete from both tiers and forget any pending upload.

        S3 goes before the local copy: a read that misses the local copy then finds nothing
        to fetch back into it.
        """
        self.known.discard(key)
        self.pending.remove(key)
        self._count_delete(key)
        self.remote.delete(key)
        self.local.delete(key)

    def _count_delete(self, key: str) -> None:
        with self._deletes_lock:
            self._deletes[key] = self._deletes.pop(key, 0) + 1
            while len(self._deletes) > MAX_REMEMBERED_DELETES:
                del self._deletes[next(iter(self._deletes))]  # the oldest

    def evict(self, key: str, deleted_at: float) -> None:
        """Forget `key`, which another replica deleted from S3 at `deleted_at`: the local copy
        (a fetch from S3 that the eviction overtakes keeps nothing either), the memory of it
        being in S3, and a pending upload written before the delete (the delete wins). A
        pending upload written after it is a new object under the same key, and stays."""
        pending = self.pending.get(key)
        if pending is not None and pending.since_timestamp > deleted_at:
            return
        self.known.discard(key)
        self.pending.remove(key)
        self._count_delete(key)
        self.local.delete(key)

    @property
    def state_dir(self) -> Path:
        """This machine's records about S3 (pending uploads, deletes read), in the local tier."""
        return self.local.root / STATE_DIR

    def pending_since(self, key: str) -> float | None:
        """When the pending upload of `key` was first held, or None when it is not pending."""
        pending = self.pending.get(key)
        return None if pending is None else pending.since_timestamp

    def cached_keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` held on this machine: local copies and pending uploads."""
        folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        pending = (key for key in self.pending_keys() if key.startswith(folder))
        return sorted({*self.local.list_keys(prefix), *pending})

    def list_keys(self, prefix: str) -> list[str]:
        """Keys in S3 plus those still pending locally."""
        remote = set(self.remote.list_keys(prefix))
        folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        remote.update(key for key in self.pending_keys() if key.startswith(folder))
        return sorted(remote)

    def list_page(self, prefix: str, start_after: str, limit: int) -> list[str]:
        """A page of S3's keys, with the pending ones that fall in it."""
        remote = self.remote.list_page(prefix, start_after, limit)
        folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        # A pending key belongs on this page when it sorts before the page's last S3 key (or
        # S3 had no more keys): the next page starts after that key.
        end = remote[-1] if len(remote) == limit else None
        pending = [
            key
            for key in self.pending_keys()
            if key.startswith(folder) and key > start_after and (end is None or key < end)
        ]
        return sorted({*remote, *pending})[:limit]

    def presign(self, key: str, expires_in: int) -> PresignedUrl:
        """A presigned S3 URL."""
        return self.remote.presign(key, expires_in)

    def presign_known(self, key: str, expires_in: int) -> PresignedUrl | None:
        """Presign without any I/O when `key` is known to be in S3, else None.

        Safe to call on the event loop: a set lookup and a signature, no file or network access.
        """
        if key in self.known and key not in self.pending and self.remote.signs_without_io():
            return self.remote.presign(key, expires_in)
        return None

    def presign_existing(self, key: str, expires_in: int) -> PresignedUrl | None:
        """A presigned URL when S3 holds `key`; None when it does not or cannot be reached.

        Keys this process uploaded or saw in S3 are trusted without a request; others cost
        one HEAD.
        """
        if key in self.pending:
            return None
        if key not in self.known:
            try:
                if not self.remote.exists(key):
                    return None
            except StorageError as error:
                logger.warning("cannot check %s in S3, serving locally: %s", key, error)
                return None
            self.known.add(key)
        return self.remote.presign(key, expires_in)

    def local_copy(self, key: str) -> Path | None:
        """The local file for `key`, fetched from S3 into the local tier when missing there.

        None when neither tier holds it; StorageError when only S3 could and is unreachable.
        """
        path = self.local.local_copy(key)
        if path is not None:
            return path
        deletes = self._deletes.get(key)
        try:
            self.remote.download(key, self.local.path_for(key))
        except ObjectNotFoundError:
            return None
        if self._drop_if_deleted_since(key, deletes):
            return None
        return self.local.local_copy(key)

    def hold(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Write the local copy only and mark it pending; retry_pending reconciles it with S3."""
        stored = self.local.put_bytes(key, data, content_type)
        self.known.discard(key)
        self.pending.add(key, content_type, "held locally while S3 was unreachable")
        return StoredObject(stored.info, pending=True)

    def is_pending(self, key: str) -> bool:
        """Whether `key` is held locally only."""
        return key in self.pending

    def pending_keys(self) -> list[str]:
        """Keys waiting for an upload."""
        return [record.key for record in self.pending.records()]

    def retry_pending(self, merger_for: MergerFor | None = None) -> list[str]:
        """Upload every pending key from its local copy; return those that succeeded.

        Uploads are create-if-absent: an object another replica stored meanwhile is newer than
        this copy and stays, unless `merger_for(key)` combines the two (a job manifest, say).
        """
        uploaded = []
        for record in self.pending.records():
            try:
                source = self.local.path_for(record.key)
                if not source.is_file():
                    logger.error("pending upload %s has no local copy; dropping it", record.key)
                    self.pending.remove(record.key)
                    continue
                try:
                    self.remote.put_file(record.key, source, record.content_type, if_absent=True)
                except PreconditionFailedError:
                    merge = merger_for(record.key) if merger_for is not None else None
                    self._reconcile(record.key, source, record.content_type, merge)
                else:
                    if not source.is_file():
                        # Deleted while it was uploading: the delete wins, never the upload.
                        self.remote.delete(record.key)
                        continue
            except (StorageError, OSError) as error:
                self.pending.add(record.key, record.content_type, str(error))
                continue
            self.pending.remove(record.key)
            self.known.add(record.key)
            uploaded.append(record.key)
        if uploaded:
            logger.info("uploaded %d pending object(s)", len(uploaded))
        return uploaded

    def _reconcile(self, key: str, source: Path, content_type: str, merge: Merge | None) -> None:
        """S3 got an object under a pending key meanwhile: merge into it, or let it stand."""
        if merge is not None:
            mine = source.read_bytes()
            updated = update_object(
                self.remote,
                key,
                lambda theirs: None if theirs is None else merge(mine, theirs),
                content_type=content_type,
            )
            if updated.changed:
                logger.info("merged the pending copy of %s into the one in S3", key)
            if updated.data is not None:
                self.local.put_bytes(key, updated.data, content_type)  # cache what S3 holds
                return
        logger.warning("%s was stored in S3 by another writer meanwhile; that copy stands", key)
        self.local.delete(key)  # stale here: the next read fetches S3's

    def check(self) -> None:
        """Raise a StorageError unless S3 answers."""
        self.remote.check()

    def close(self) -> None:
        """Stop the upload threads and close the S3 client."""
        self._pool.shutdown(wait=True)
        self.remote.close()

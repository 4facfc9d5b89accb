"""Deletes every replica sees: a tombstone in the shared store per delete, read by all.

A replica caches what it served: local copies of S3 objects, presigned URLs, where each image
was found. A delete on another replica empties S3 at once, but not those caches. So the
deleting replica first writes a tombstone, `deletions/{milliseconds}-{kind}-{id}` (empty,
create-if-absent), and every replica lists the tombstones written since it last looked, every
DELETE_POLL_SECONDS, and drops what it holds of each: the window in which another replica
still serves a deleted image is one poll interval and one listing.

Tombstones are named by the writing replica's clock. A listing starts LOOKBACK_SECONDS before
the previous one that succeeded, so clocks may disagree by that much; a replica that could not
reach S3 catches up from where it stopped, and so does one restarted on the same OUTPUT_DIR
(it keeps its position in the local tier). Tombstones are tiny and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from mv.ids import InvalidKeyError, parse_image_id, parse_job_id
from services.asset_persistence.deletion import character_reference_keys
from services.asset_persistence.delivery import ImageDelivery
from services.asset_persistence.references import CharacterReferences
from services.storage import (
    CHARACTER_REFERENCES_PREFIX,
    JOBS_PREFIX,
    CachesSharedObjects,
    KnownKeys,
    PreconditionFailedError,
    StorageBackend,
    StorageError,
    job_prefix,
)
from services.storage.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

TOMBSTONE_PREFIX = "deletions"
LOOKBACK_SECONDS = 60.0
PAGE_SIZE = 1000
# The position read so far is written down at most this often (and whenever a poll found
# tombstones): a restart lists at most this much again.
SAVE_POSITION_EVERY_SECONDS = 60.0
POSITION_FILE = "deletions-position.json"

Kind = Literal["image", "job"]
_PARSERS: dict[str, Callable[[str], str]] = {"image": parse_image_id, "job": parse_job_id}


@dataclass(frozen=True, slots=True)
class Tombstone:
    """One delete: what was deleted, and when (by the deleting replica's clock)."""

    kind: Kind
    id: str
    deleted_at: float  # seconds since the epoch

    @property
    def key(self) -> str:
        """Its key in the shared store; keys sort by time."""
        return f"{TOMBSTONE_PREFIX}/{round(self.deleted_at * 1000):013d}-{self.kind}-{self.id}"

    @classmethod
    def from_key(cls, key: str) -> Tombstone | None:
        """The tombstone a key names; None for anything else under the prefix."""
        milliseconds, _, rest = key.removeprefix(f"{TOMBSTONE_PREFIX}/").partition("-")
        kind, _, id_ = rest.partition("-")
        if not milliseconds.isdigit() or kind not in get_args(Kind):
            return None
        try:
            return cls(kind, _PARSERS[kind](id_), int(milliseconds) / 1000)  # type: ignore[arg-type]
        except InvalidKeyError:
            return None

    def covers(self, key: str) -> bool:
        """Whether `key` is one of the objects this delete removed."""
        if self.kind == "image":
            return key in character_reference_keys(self.id)
        return key.startswith(job_prefix(self.id))


def _listing_start(position: float | None) -> str:
    """The key a listing starts after: LOOKBACK_SECONDS before `position` (None: the start)."""
    if position is None:
        return ""
    return f"{TOMBSTONE_PREFIX}/{max(0, round((position - LOOKBACK_SECONDS) * 1000)):013d}"


class DeletionFeed:
    """Writes tombstones to the shared store and reads the ones this replica has not seen."""

    def __init__(
        self, store: StorageBackend, state_dir: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.clock = clock
        self._position_file = state_dir / POSITION_FILE
        self._position = self._load_position()
        self._saved_position = self._position
        self._seen: dict[str, Tombstone] = {}  # those a listing from the position may return
        self._lock = threading.Lock()

    def _load_position(self) -> float | None:
        try:
            return float(json.loads(self._position_file.read_bytes())["position"])
        except FileNotFoundError:
            return None  # never read here: read every tombstone, this tier may be old
        except (ValueError, KeyError, TypeError):
            logger.warning("%s is damaged; reading every tombstone again", self._position_file)
            return None

    @property
    def never_read(self) -> bool:
        """Whether this replica has no position yet (a fresh local tier, or an older one)."""
        return self._position is None

    def skip_history(self) -> None:
        """Start reading from now: nothing is cached here that an older delete could cover."""
        with self._lock:
            self._position = self.clock()

    def write(self, kind: Kind, id_: str) -> Tombstone:
        """Write a tombstone for `id_`, before the objects go. Blocking."""
        tombstone = Tombstone(kind, id_, self.clock())
        # The same delete in the same millisecond: one tombstone says it.
        with contextlib.suppress(PreconditionFailedError):
            self.store.put_if_absent(tombstone.key, b"", "application/octet-stream")
        with self._lock:
            self._seen[tombstone.key] = tombstone  # this replica's own: applied already
        return tombstone

    def read_new(self) -> tuple[list[Tombstone], float]:
        """Tombstones written since the last read (by the other replicas), oldest first, and
        when this read began: pass both to `mark_applied` once they are applied.

        Blocking: one listing per thousand tombstones in the window read.
        """
        started = self.clock()
        with self._lock:
            start_after = _listing_start(self._position)
        keys: list[str] = []
        while True:
            page = self.store.list_page(TOMBSTONE_PREFIX, start_after, PAGE_SIZE)
            keys.extend(page)
            if len(page) < PAGE_SIZE:
                break
            start_after = page[-1]
        with self._lock:
            new = [
                tombstone
                for key in keys
                if key not in self._seen and (tombstone := Tombstone.from_key(key)) is not None
            ]
        return new, started

    def mark_applied(self, tombstones: list[Tombstone], started: float) -> None:
        """Remember that `tombstones`, read at `started`, are applied: the next read starts
        from there. Blocking (it may save the position)."""
        with self._lock:
            self._seen.update((tombstone.key, tombstone) for tombstone in tombstones)
            self._position = started
            horizon = started - LOOKBACK_SECONDS  # older ones are not listed again
            self._seen = {k: t for k, t in self._seen.items() if t.deleted_at >= horizon}
        self._save_position(started, force=bool(tombstones))

    def recent(self) -> list[Tombstone]:
        """The tombstones seen that a listing may still return (the last LOOKBACK_SECONDS)."""
        with self._lock:
            return list(self._seen.values())

    def _save_position(self, position: float, *, force: bool) -> None:
        saved = self._saved_position
        if not force and saved is not None and position - saved < SAVE_POSITION_EVERY_SECONDS:
            return
        try:
            write_bytes_atomic(self._position_file, json.dumps({"position": position}).encode())
        except OSError as error:  # a restart lists more again; nothing is lost
            logger.warning("could not save the deletes read so far: %s", error)
            return
        self._saved_position = position


class SharedDeletes:
    """Announces this replica's deletes, and applies the other replicas' to what it cached."""

    def __init__(
        self,
        storage: CachesSharedObjects,
        delivery: ImageDelivery,
        references: CharacterReferences,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.delivery = delivery
        self.references = references
        self.clock = clock
        self._feed: DeletionFeed | None = None  # made on first use: building this touches nothing
        self._catching_up = asyncio.Lock()
        # Uploads of pending keys not yet checked against a listing made after them: key ->
        # (when it was first held, when it was uploaded).
        self._unchecked: dict[str, tuple[float, float]] = {}
        self._deleted_again = KnownKeys(capacity=10_000)

    @property
    def feed(self) -> DeletionFeed:
        """The tombstones in the shared tier; the first use reads this replica's position from
        disk (call it off the event loop first: `catch_up` and `announce` do)."""
        if self._feed is None:
            self._feed = DeletionFeed(self.storage.remote, self.storage.state_dir, self.clock)
        return self._feed

    async def announce(self, kind: Kind, id_: str) -> None:
        """Tell the other replicas, before deleting: then no delete can go unseen."""
        await asyncio.to_thread(lambda: self.feed.write(kind, id_))

    async def catch_up(self) -> list[Tombstone]:
        """Apply the deletes other replicas made since the last call; return them.

        StorageError when the shared tier cannot be listed: nothing is lost, the next call
        reads from the same point.
        """
        async with self._catching_up:  # one listing at a time, applied in order
            await asyncio.to_thread(self._start_reading)
            tombstones, started = await asyncio.to_thread(self.feed.read_new)
            for tombstone in tombstones:  # a failure here leaves them all to the next read
                await self._apply(tombstone)
            await asyncio.to_thread(self.feed.mark_applied, tombstones, started)
            await self._delete_overtaken_uploads(started)
        if tombstones:
            logger.info("applied %d delete(s) made by other replicas", len(tombstones))
        return tombstones

    def _start_reading(self) -> None:
        """Read from now when this replica never read and caches nothing an older delete
        could cover. Blocking."""
        prefixes = (CHARACTER_REFERENCES_PREFIX, JOBS_PREFIX)
        if self.feed.never_read and not any(map(self.storage.cached_keys, prefixes)):
            self.feed.skip_history()

    async def _apply(self, tombstone: Tombstone) -> None:
        if tombstone.kind == "image":
            keys = character_reference_keys(tombstone.id)
            self.references.forget_location(tombstone.id)
            self.delivery.forget(keys)
        else:
            prefix = job_prefix(tombstone.id)
            keys = await asyncio.to_thread(self.storage.cached_keys, prefix)
            self.delivery.forget_prefix(prefix)

        def evict_all() -> None:
            for key in keys:
                self.storage.evict(key, tombstone.deleted_at)

        await asyncio.to_thread(evict_all)

    async def retry_pending(self, retry: Callable[[], Awaitable[list[str]]]) -> list[str]:
        """Run `retry` (the pending uploads) so that it never brings back a deleted object.

        Deletes are read first, and drop the pending uploads they cover; while they cannot be
        read, nothing is uploaded. A delete made while the uploads ran is read by the next
        catch-up (at once, here), and an object it covers that was held before it is deleted
        again: the delete wins. Returns the keys uploaded and kept.
        """
        try:
            await self.catch_up()
        except StorageError as error:
            logger.warning("cannot read the other replicas' deletes; uploads wait: %s", error)
            return []
        held_since = {
            key: self.storage.pending_since(key) or math.inf for key in self.storage.pending_keys()
        }
        uploaded = await retry()
        finished = self.clock()
        for key in uploaded:
            self._unchecked[key] = (held_since.get(key, math.inf), finished)
        with contextlib.suppress(StorageError):  # else the next catch-up checks them
            await self.catch_up()
        return [key for key in uploaded if key not in self._deleted_again]

    async def _delete_overtaken_uploads(self, listed_from: float) -> None:
        """Delete again what an upload put back after a delete; stop checking the uploads that
        a listing begun at `listed_from`, after they finished, has covered."""
        for key, (held_since, finished) in list(self._unchecked.items()):
            if any(
                tombstone.covers(key) and held_since <= tombstone.deleted_at
                for tombstone in self.feed.recent()
            ):
                logger.warning("%s was deleted elsewhere while it uploaded; deleted again", key)
                await asyncio.to_thread(self.storage.delete, key)
                self._deleted_again.add(key)
                del self._unchecked[key]
            elif listed_from > finished:
                del self._unchecked[key]

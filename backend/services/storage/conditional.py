"""Records shared between processes: read-modify-write as compare-and-swap, bounded retries.

Every replica reads a record with its version, computes the new bytes, and writes them only if
the record still has that version; the loser of a race reads again and recomputes. Retries
back off with full jitter, so writers that collided once do not collide again in lockstep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.storage.base import StorageBackend
from services.storage.errors import (
    ConcurrentUpdateError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageUnavailableError,
)

# The current bytes (None when absent) -> the new bytes, or None to leave the record as it is.
Change = Callable[[bytes | None], bytes | None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times a compare-and-swap is tried, and how long it waits between tries."""

    attempts: int = 16
    first_delay: float = 0.005
    max_delay: float = 0.2

    def delay(self, conflicts: int) -> float:
        """Seconds to wait after the n-th conflict: uniform in [0, capped exponential]."""
        return random.uniform(0, min(self.max_delay, self.first_delay * 2**conflicts))


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Updated:
    """The outcome of `update_object`."""

    data: bytes | None  # what the record holds now (None: absent, and left so)
    changed: bool
    conflicts: int  # how many times another writer got in first


def update_object(
    storage: StorageBackend,
    key: str,
    change: Change,
    *,
    content_type: str = "application/json",
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> Updated:
    """Apply `change` to the record under `key` so that no concurrent update is lost.

    Blocking: run it off the event loop. ConcurrentUpdateError when other writers won
    `retry.attempts` times in a row.
    """
    conflicts = 0
    while True:
        try:
            current = storage.get_versioned(key)
        except ObjectNotFoundError:
            current = None
        new = change(None if current is None else current.data)
        if new is None:
            return Updated(None if current is None else current.data, False, conflicts)
        try:
            if current is None:
                storage.put_if_absent(key, new, content_type)
            else:
                storage.put_if_match(key, new, content_type, current.version)
        except PreconditionFailedError:
            conflicts += 1
            if conflicts >= retry.attempts:
                raise ConcurrentUpdateError(
                    f"{key!r} kept changing under {conflicts} attempts to update it; retry"
                ) from None
            sleep(retry.delay(conflicts))
            continue
        return Updated(new, True, conflicts)


def read_latest(storage: StorageBackend, key: str) -> bytes:
    """A shared record as the arbitrating tier holds it now.

    When that tier cannot be reached, the local copy (the last state this machine knew) is
    returned instead, so reads keep working through an outage. ObjectNotFoundError if absent.
    """
    try:
        return storage.get_versioned(key).data
    except StorageUnavailableError:
        return storage.get_bytes(key)

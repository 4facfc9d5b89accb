"""Idempotency keys: the same key and body give the same resource; another body is refused.

A record per key, stored at `idempotency/{scope}/{sha256(key)}.json`, names the resource the
first request created and a fingerprint of its body. Records older than a day are replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from services.asset_persistence import utc_now
from services.storage import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageBackend,
)

IDEMPOTENCY_PREFIX = "idempotency"
KEY_LIFETIME = timedelta(days=1)
# A reservation whose request has named no resource after this long is taken over: its
# replica died mid-request. Creating the resource (queueing a generation, writing a job
# record) takes well under a second.
ABANDONED_AFTER = timedelta(seconds=60)
RESERVATION_WAIT_SECONDS = 30.0
MAX_KEY_CHARS = 255

logger = logging.getLogger(__name__)


class IdempotencyKeyError(ValueError):
    """The Idempotency-Key header is malformed, or was used before with another body."""


class IdempotencyKeyInUseError(Exception):
    """Another request with this key is still creating its resource (for longer than we wait)."""


class IdempotencyRecord(BaseModel):
    """What the first request with a key created; no resource yet while it is being created."""

    scope: str
    fingerprint: str
    resource_id: str | None = None
    created_at: datetime
    owner: str | None = None  # keys are per owner: the same key of two owners is two records


def fingerprint(body: Any) -> str:
    """A digest of a request body that ignores key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    """The key if it is 1-255 printable ASCII characters; IdempotencyKeyError otherwise."""
    if not 1 <= len(key) <= MAX_KEY_CHARS or not (key.isascii() and key.isprintable()):
        raise IdempotencyKeyError(
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters"
        )
    return key


def record_key(scope: str, key: str, owner: str | None = None) -> str:
    """The storage key of an owner's key's record: a fixed-shape hash, whatever the client
    sent (without owners, of the key alone)."""
    scoped = key if owner is None else f"{owner}\n{key}"
    return f"{IDEMPOTENCY_PREFIX}/{scope}/{hashlib.sha256(scoped.encode()).hexdigest()}.json"


@dataclass
class Reservation:
    """Inside `IdempotencyStore.reserve`: the earlier resource, or a slot to record a new one."""

    existing: str | None
    created: str | None = None

    def record(self, resource_id: str) -> None:
        """Name the resource this request created."""
        self.created = resource_id


def _is_stale(record: IdempotencyRecord) -> bool:
    """A record to take over: expired, or a reservation whose owner never finished."""
    age = utc_now() - record.created_at
    return age >= KEY_LIFETIME or (record.resource_id is None and age >= ABANDONED_AFTER)


class IdempotencyStore:
    """Remembers which resource each key created, per scope (one scope per route).

    One owner per key across every replica: the first request creates the key's record in the
    store (create-if-absent) before it creates anything; a request that finds a reservation
    waits for the resource it names, and one that finds a finished record replays it.
    """

    def __init__(
        self,
        storage: StorageBackend,
        *,
        wait_seconds: float = RESERVATION_WAIT_SECONDS,
    ) -> None:
        self.storage = storage
        self.wait_seconds = wait_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    async def _claim(
        self, scope: str, storage_key: str, digest: str, owner: str | None
    ) -> tuple[str | None, str]:
        """(the earlier resource, "") or (None, the version of the reservation made for us)."""
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.02
        while True:
            try:
                current = await asyncio.to_thread(self.storage.get_versioned, storage_key)
            except ObjectNotFoundError:
                current = None
            record = None if current is None else _parse(current.data)
            if record is None or _is_stale(record):
                claim = IdempotencyRecord(
                    scope=scope, fingerprint=digest, created_at=utc_now(), owner=owner
                )
                data = claim.model_dump_json().encode()
                try:
                    if current is None:
                        version = await asyncio.to_thread(
                            self.storage.put_if_absent, storage_key, data, "application/json"
                        )
                    else:
                        version = await asyncio.to_thread(
                            self.storage.put_if_match,
                            storage_key,
                            data,
                            "application/json",
                            current.version,
                        )
                except PreconditionFailedError:
                    continue  # another request claimed it first: read what it wrote
                return None, version
            if record.fingerprint != digest:
                raise IdempotencyKeyError(
                    "this Idempotency-Key was used with a different request body"
                )
            if record.resource_id is not None:
                return record.resource_id, ""
            if time.monotonic() > deadline:
                raise IdempotencyKeyInUseError(
                    "another request with this Idempotency-Key is still in progress; retry"
                )
            await asyncio.sleep(delay)  # another replica is creating the resource
            delay = min(delay * 2, 0.5)

    @contextlib.asynccontextmanager
    async def reserve(
        self, scope: str, key: str, body: Any, owner: str | None = None
    ) -> AsyncIterator[Reservation]:
        """Hold `owner`'s key while the caller creates its resource (or reuses the earlier one).

        Raises IdempotencyKeyError when the key was used with a different body, and
        IdempotencyKeyInUseError when another request has held it for longer than
        `wait_seconds`. If the caller fails, the key is released for a retry.
        """
        storage_key = record_key(scope, check_key(key), owner)
        digest = fingerprint(body)
        lock = self._locks.setdefault(storage_key, asyncio.Lock())
        self._lock_users[storage_key] = self._lock_users.get(storage_key, 0) + 1
        try:
            async with lock:  # requests in this process queue here instead of polling
                existing, version = await self._claim(scope, storage_key, digest, owner)
                reservation = Reservation(existing)
                if existing is not None:
                    yield reservation
                    return
                try:
                    yield reservation
                except BaseException:
                    await asyncio.to_thread(self.storage.delete, storage_key)
                    raise
                await self._complete(scope, storage_key, digest, version, reservation, owner)
        finally:
            self._lock_users[storage_key] -= 1
            if not self._lock_users[storage_key]:  # nobody else holds or waits: forget it
                del self._lock_users[storage_key], self._locks[storage_key]

    async def _complete(
        self,
        scope: str,
        storage_key: str,
        digest: str,
        version: str,
        reservation: Reservation,
        owner: str | None,
    ) -> None:
        if reservation.created is None:  # nothing was created: free the key
            await asyncio.to_thread(self.storage.delete, storage_key)
            return
        done = IdempotencyRecord(
            scope=scope,
            fingerprint=digest,
            resource_id=reservation.created,
            created_at=utc_now(),
            owner=owner,
        )
        try:
            await asyncio.to_thread(
                self.storage.put_if_match,
                storage_key,
                done.model_dump_json().encode(),
                "application/json",
                version,
            )
        except PreconditionFailedError:
            # Taken over as abandoned while this request ran far too long: the taker's
            # resource is the key's from now on.
            logger.warning("idempotency key record %s was taken over; not replaced", storage_key)


def _parse(raw: bytes) -> IdempotencyRecord | None:
    try:
        return IdempotencyRecord.model_validate_json(raw)
    except ValueError:
        return None  # damaged: taken over like an expired one

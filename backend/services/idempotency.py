"""Idempotency keys: the same key and body give the same resource; another body is refused.

A record per key, stored at `idempotency/{scope}/{sha256(key)}.json`, names the resource the
first request created and a fingerprint of its body. Records older than a day are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from services.asset_records import utc_now
from services.storage.base import StorageBackend
from services.storage.errors import ObjectNotFoundError

IDEMPOTENCY_PREFIX = "idempotency"
KEY_LIFETIME = timedelta(days=1)
MAX_KEY_CHARS = 255


class IdempotencyKeyError(ValueError):
    """The Idempotency-Key header is malformed, or was used before with another body."""


class IdempotencyRecord(BaseModel):
    """What the first request with a key created."""

    scope: str
    fingerprint: str
    resource_id: str
    created_at: datetime


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


def record_key(scope: str, key: str) -> str:
    """The storage key of a key's record: a fixed-shape hash, whatever the client sent."""
    return f"{IDEMPOTENCY_PREFIX}/{scope}/{hashlib.sha256(key.encode()).hexdigest()}.json"


@dataclass
class Reservation:
    """Inside `IdempotencyStore.reserve`: the earlier resource, or a slot to record a new one."""

    existing: str | None
    created: str | None = None

    def record(self, resource_id: str) -> None:
        """Name the resource this request created."""
        self.created = resource_id


class IdempotencyStore:
    """Remembers which resource each key created, per scope (one scope per route)."""

    def __init__(self, storage: StorageBackend) -> None:
        self.storage = storage
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    async def _load(self, storage_key: str) -> IdempotencyRecord | None:
        try:
            raw = await asyncio.to_thread(self.storage.get_bytes, storage_key)
        except ObjectNotFoundError:
            return None
        record = IdempotencyRecord.model_validate_json(raw)
        return record if utc_now() - record.created_at < KEY_LIFETIME else None

    @contextlib.asynccontextmanager
    async def reserve(self, scope: str, key: str, body: Any) -> AsyncIterator[Reservation]:
        """Hold the key while the caller creates its resource (or reuses the earlier one).

        Raises IdempotencyKeyError when the key was used with a different body. Requests with
        one key in this process run one at a time, so a retry racing the first request sees
        what the first created.
        """
        storage_key = record_key(scope, check_key(key))
        digest = fingerprint(body)
        lock = self._locks.setdefault(storage_key, asyncio.Lock())
        self._lock_users[storage_key] = self._lock_users.get(storage_key, 0) + 1
        try:
            async with lock:
                record = await self._load(storage_key)
                if record is not None and record.fingerprint != digest:
                    raise IdempotencyKeyError(
                        "this Idempotency-Key was used with a different request body"
                    )
                reservation = Reservation(record.resource_id if record else None)
                yield reservation
                if reservation.existing is None and reservation.created is not None:
                    new = IdempotencyRecord(
                        scope=scope,
                        fingerprint=digest,
                        resource_id=reservation.created,
                        created_at=utc_now(),
                    )
                    await asyncio.to_thread(
                        self.storage.put_bytes,
                        storage_key,
                        new.model_dump_json().encode(),
                        "application/json",
                    )
        finally:
            self._lock_users[storage_key] -= 1
            if not self._lock_users[storage_key]:  # nobody else holds or waits: forget it
                del self._lock_users[storage_key], self._locks[storage_key]

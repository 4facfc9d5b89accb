"""Deleting stored images and jobs from every tier, in an order that is safe to repeat.

Derived and dependent objects go first and the object that says "this exists" goes last
(an image's sidecar, a job's manifest), so a delete that fails half-way is finished by the
next one instead of leaving files nobody can find.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from services.asset_persistence.listing import CharacterReferenceIndex
from services.asset_persistence.records import CharacterReferenceRecord
from services.storage import (
    IMAGE_CONTENT_TYPES,
    THUMBNAIL_SIZES,
    StorageBackend,
    character_reference_key,
    character_reference_sidecar_key,
    job_manifest_key,
    job_prefix,
    thumbnail_key,
)

# Tells the other replicas of a delete, before it is made.
Announce = Callable[[], Awaitable[None]]


def character_reference_keys(image_id: str) -> list[str]:
    """Every key a standalone image may occupy, in deletion order (the sidecar last)."""
    images = [character_reference_key(image_id, extension) for extension in IMAGE_CONTENT_TYPES]
    thumbnails = [
        thumbnail_key(image, size) for image, size in itertools.product(images, THUMBNAIL_SIZES)
    ]
    return [*thumbnails, *images, character_reference_sidecar_key(image_id)]


async def _delete_all(storage: StorageBackend, keys: list[str]) -> None:
    """Delete `keys` concurrently (each delete is idempotent)."""
    await asyncio.gather(*(asyncio.to_thread(storage.delete, key) for key in keys))


async def delete_character_reference(
    storage: StorageBackend,
    image_id: str,
    record: CharacterReferenceRecord | None,
    announce: Announce | None = None,
) -> list[str]:
    """Delete a standalone image's list entries, thumbnails, image and sidecar (`record`, as
    the caller read it; None when there is none); return the keys of the image, thumbnails
    and sidecar that were there (empty: nothing to delete).

    `announce` is awaited before anything is deleted, when there is something to delete.
    """
    keys = character_reference_keys(image_id)
    present = await asyncio.gather(*(asyncio.to_thread(storage.exists, key) for key in keys))
    found = [key for key, exists in zip(keys, present, strict=True) if exists]
    if announce is not None and (found or record is not None):
        await announce()
    if record is not None:  # out of every list first: a list never names a deleted image
        await asyncio.to_thread(CharacterReferenceIndex(storage).remove, record)
    if found:
        *dependent, sidecar = keys
        await _delete_all(storage, dependent)
        await asyncio.to_thread(storage.delete, sidecar)
    return found


async def delete_job_files(
    storage: StorageBackend, job_id: str, announce: Announce | None = None
) -> list[str]:
    """Delete every file of a job (thumbnails included), then its manifest; return the keys.

    `announce` is awaited before anything is deleted, when there is something to delete.
    """
    manifest = job_manifest_key(job_id)
    keys = await asyncio.to_thread(storage.list_keys, job_prefix(job_id))
    if announce is not None and keys:
        await announce()
    await _delete_all(storage, [key for key in keys if key != manifest])
    await asyncio.to_thread(storage.delete, manifest)
    return keys

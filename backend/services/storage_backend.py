"""Storage backends behind one interface, and the factory that picks one from settings."""

from __future__ import annotations

from typing import Any

from config import Settings
from services.storage.base import (
    HoldsPendingUploads,
    ObjectInfo,
    PresignedUrl,
    SignsKnownKeysWithoutIO,
    SignsUrls,
    StorageBackend,
    StoredObject,
)
from services.storage.errors import (
    IntegrityError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from services.storage.local import LocalStorageBackend
from services.storage.s3 import S3StorageBackend, make_s3_client
from services.storage.write_through import WriteThroughStorageBackend

__all__ = [
    "HoldsPendingUploads",
    "IntegrityError",
    "InvalidKeyError",
    "LocalStorageBackend",
    "ObjectInfo",
    "ObjectNotFoundError",
    "PresignedUrl",
    "S3StorageBackend",
    "SignsKnownKeysWithoutIO",
    "SignsUrls",
    "StorageBackend",
    "StorageError",
    "StorageUnavailableError",
    "StoredObject",
    "WriteThroughStorageBackend",
    "get_storage_backend",
]


def get_storage_backend(settings: Settings, *, s3_client: Any | None = None) -> StorageBackend:
    """The backend STORAGE_BACKEND selects: local disk, or S3 written through local disk."""
    local = LocalStorageBackend(settings.output_dir)
    if settings.storage_backend == "local":
        return local
    assert settings.storage_bucket is not None  # guaranteed by Settings validation
    client = s3_client or make_s3_client(
        region=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        max_attempts=settings.s3_max_attempts,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_pool_connections=2 * settings.storage_max_concurrency,
    )
    remote = S3StorageBackend(settings.storage_bucket, client)
    return WriteThroughStorageBackend(local, remote, max_workers=settings.storage_max_concurrency)

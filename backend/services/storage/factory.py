"""The storage backend the settings select: local disk, or S3 written through local disk."""

from __future__ import annotations

from typing import Any

from config import Settings
from services.storage.base import StorageBackend
from services.storage.local import LocalStorageBackend
from services.storage.s3 import (
    S3StorageBackend,
    StorageObserver,
    make_s3_client,
    observe_s3_calls,
)
from services.storage.write_through import WriteThroughStorageBackend


def get_storage_backend(
    settings: Settings,
    *,
    s3_client: Any | None = None,
    observe: StorageObserver | None = None,
) -> StorageBackend:
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
    if observe is not None:
        observe_s3_calls(client, observe)
    remote = S3StorageBackend(settings.storage_bucket, client)
    return WriteThroughStorageBackend(local, remote, max_workers=settings.storage_max_concurrency)

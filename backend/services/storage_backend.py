"""Storage backends behind one interface, and the factory that picks one from settings."""

from __future__ import annotations

import time
from collections.abc import Callable
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


StorageObserver = Callable[[str, str, float, bool], None]  # backend, operation, seconds, ok


def observe_s3_calls(client: Any, observe: StorageObserver) -> None:
    """Report every S3 API call's latency and outcome to `observe` (botocore event hooks).

    A 404 is an answer (a HEAD finding nothing), not an error.
    """

    def before(context: dict[str, Any], **_: Any) -> None:
        context["mv_started"] = time.perf_counter()

    def report(event_name: str, context: dict[str, Any], ok: bool) -> None:
        operation = event_name.rpartition(".")[2]  # after-call.s3.PutObject -> PutObject
        started = context.get("mv_started")
        if started is not None:
            observe("s3", operation, time.perf_counter() - started, ok)

    def after(event_name: str, context: dict[str, Any], http_response: Any, **_: Any) -> None:
        status = getattr(http_response, "status_code", 200)
        report(event_name, context, status < 400 or status == 404)

    def failed(event_name: str, context: dict[str, Any], **_: Any) -> None:
        report(event_name, context, False)

    events = client.meta.events
    events.register("before-call.s3", before)
    events.register("after-call.s3", after)
    events.register("after-call-error.s3", failed)


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

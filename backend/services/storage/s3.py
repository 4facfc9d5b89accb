"""S3StorageBackend: objects in one bucket of S3 or any S3-compatible store."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from echo import shown
from services.storage.atomic import CHUNK_SIZE, atomic_writer, sha256_file
from services.storage.base import ObjectInfo, PresignedUrl, StoredObject, VersionedObject
from services.storage.errors import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
)
from services.storage.keys import validate_key
from services.storage.presign import S3Presigner

# Up to this size a file is sent in one PUT with its SHA-256; larger ones go multipart.
SINGLE_PUT_LIMIT = 64 * 1024 * 1024
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# A conditional PUT that lost: 412 when the condition is false, 409 when another conditional
# write of the key was in flight at the same moment.
_CONDITION_FAILED_CODES = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_SHA256_METADATA = "sha256"


def make_s3_client(
    *,
    region: str,
    endpoint_url: str | None = None,
    max_attempts: int = 3,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    max_pool_connections: int = 16,
) -> Any:
    """A thread-safe S3 client: SigV4, bounded standard-mode retries, explicit timeouts."""
    config = Config(
        signature_version="s3v4",
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session().client(
        "s3", region_name=region, endpoint_url=endpoint_url, config=config
    )


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


@contextlib.contextmanager
def _translated(operation: str, key: str) -> Iterator[None]:
    """Turn botocore errors into the storage hierarchy, naming the operation and key."""
    where = shown(key)
    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFoundError(key) from None
        if code in _CONDITION_FAILED_CODES:
            raise PreconditionFailedError(key) from None
        raise StorageError(
            f"S3 {operation} of {where} failed: {code or 'unknown error'}"
        ) from error
    except NoCredentialsError:
        raise StorageError(f"S3 {operation} of {where} failed: no AWS credentials found") from None
    except (BotoConnectionError, HTTPClientError) as error:
        raise StorageUnavailableError(f"S3 {operation} of {where}: store unreachable") from error
    except BotoCoreError as error:
        raise StorageError(f"S3 {operation} of {where} failed: {type(error).__name__}") from error


class S3StorageBackend:
    """Maps a key to s3://bucket/key; uploads carry Content-Type and a SHA-256 checksum."""

    name = "s3"

    def __init__(self, bucket: str, client: Any) -> None:
        self.bucket = bucket
        self._client = client
        self._presigner = S3Presigner(client, bucket)

    def _put_object(
        self,
        key: str,
        body: bytes | BinaryIO,
        sha256: str,
        content_type: str,
        **conditions: str,
    ) -> str:
        with _translated("upload", key):
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode("ascii"),
                Metadata={_SHA256_METADATA: sha256},
                **conditions,
            )
        return str(response["ETag"])

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Upload `data` in one PUT with its SHA-256, verified by the store."""
        validate_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        self._put_object(key, data, sha256, content_type)
        return StoredObject(ObjectInfo(key, len(data), content_type, sha256))

    def put_file(
        self, key: str, source: Path, content_type: str, *, if_absent: bool = False
    ) -> StoredObject:
        """Upload a file, streamed: one PUT up to SINGLE_PUT_LIMIT, multipart above.

        With `if_absent`, PreconditionFailedError when the key exists: S3 decides for one PUT;
        above the limit a HEAD checks first, which leaves a short window.
        """
        validate_key(key)
        source = Path(source)
        sha256, size = sha256_file(source)  # the checksum header goes before the body
        conditions = {"IfNoneMatch": "*"} if if_absent else {}
        if size <= SINGLE_PUT_LIMIT:
            with source.open("rb") as body:
                self._put_object(key, body, sha256, content_type, **conditions)
            return StoredObject(ObjectInfo(key, size, content_type, sha256))
        if if_absent and self.exists(key):
            raise PreconditionFailedError(key, f"{shown(key)} exists already")
        with _translated("upload", key):
            self._client.upload_file(
                str(source),
                self.bucket,
                key,
                ExtraArgs={
                    "ContentType": content_type,
                    "ChecksumAlgorithm": "SHA256",
                    "Metadata": {_SHA256_METADATA: sha256},
                },
                Config=TransferConfig(multipart_threshold=SINGLE_PUT_LIMIT),
            )
        return StoredObject(ObjectInfo(key, size, content_type, sha256))

    def get_versioned(self, key: str) -> VersionedObject:
        """The object's bytes and ETag, in one GET."""
        validate_key(key)
        with _translated("download", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return VersionedObject(response["Body"].read(), str(response["ETag"]))

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str:
        """PUT with `If-None-Match: *`: S3 itself refuses it when the key exists."""
        validate_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        return self._put_object(key, data, sha256, content_type, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, content_type: str, version: str) -> str:
        """PUT with `If-Match: <ETag>`: S3 refuses it when the object changed or is gone."""
        validate_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            return self._put_object(key, data, sha256, content_type, IfMatch=version)
        except ObjectNotFoundError:
            raise PreconditionFailedError(key, f"{shown(key)} is gone") from None

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object."""
        validate_key(key)
        with _translated("download", key):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def download(
        self, key: str, destination: Path, expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Stream the object into `destination` atomically, checking its SHA-256 when given."""
        validate_key(key)
        digest = hashlib.sha256()
        size = 0
        with _translated("download", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            with atomic_writer(Path(destination)) as writer:
                for chunk in response["Body"].iter_chunks(CHUNK_SIZE):
                    digest.update(chunk)
                    writer.write(chunk)
                    size += len(chunk)
                actual = digest.hexdigest()
                if expected_sha256 is not None and actual != expected_sha256:
                    raise IntegrityError(key, expected_sha256, actual)
        content_type = response.get("ContentType", "application/octet-stream")
        return ObjectInfo(key, size, content_type, actual)

    def exists(self, key: str) -> bool:
        """Whether the object exists (one HEAD request)."""
        try:
            self.head(key)
        except ObjectNotFoundError:
            return False
        return True

    def head(self, key: str) -> ObjectInfo:
        """Size, content type and SHA-256 from object metadata or the stored checksum."""
        validate_key(key)
        with _translated("head", key):
            response = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        sha256 = response.get("Metadata", {}).get(_SHA256_METADATA)
        checksum = response.get("ChecksumSHA256")
        if sha256 is None and checksum and "-" not in checksum:  # "-N" marks multipart
            sha256 = base64.b64decode(checksum).hex()
        return ObjectInfo(
            key,
            int(response["ContentLength"]),
            response.get("ContentType", "application/octet-stream"),
            sha256,
        )

    def delete(self, key: str) -> None:
        """Delete the object; S3 treats a missing key as deleted."""
        validate_key(key)
        with _translated("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> list[str]:
        """All keys under the folder `prefix`, across pages."""
        folder = validate_key(prefix.rstrip("/")) + "/" if prefix.strip("/") else ""
        keys: list[str] = []
        with _translated("list", folder or "/"):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def list_page(self, prefix: str, start_after: str, limit: int) -> list[str]:
        """At most `limit` keys under the folder `prefix` after `start_after`: one request."""
        folder = validate_key(prefix.rstrip("/")) + "/" if prefix.strip("/") else ""
        with _translated("list", folder or "/"):
            page = self._client.list_objects_v2(
                Bucket=self.bucket,
                Prefix=folder,
                StartAfter=max(start_after, folder),
                MaxKeys=limit,
            )
        return sorted(item["Key"] for item in page.get("Contents", []))[:limit]

    def presign(self, key: str, expires_in: int) -> PresignedUrl:
        """A presigned GET URL (no request is made)."""
        validate_key(key)
        with _translated("presign", key):
            return self._presigner.presign(key, expires_in)

    def signs_without_io(self) -> bool:
        """Whether presign() would run without any network call right now."""
        return self._presigner.signs_without_io()

    def check(self) -> None:
        """Raise a StorageError unless the bucket answers."""
        with _translated("head_bucket", self.bucket):
            self._client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

"""The StorageBackend contract, S3 specifics, presigning, and S3 outages in write-through mode."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import httpx
import pytest
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws
from moto.server import ThreadedMotoServer

from config import Settings
from conftest import S3_STORAGE_MODES, StorageHarness, image_bytes, new_bucket_name
from services.asset_persistence import AssetPersistenceService
from services.storage import (
    IntegrityError,
    ObjectNotFoundError,
    S3StorageBackend,
    SignsUrls,
    StorageError,
    StorageUnavailableError,
    WriteThroughStorageBackend,
    get_storage_backend,
)
from services.storage import s3 as s3_module
from services.storage.atomic import atomic_writer
from services.storage.presign import S3Presigner
from services.storage.s3 import make_s3_client

# ------------------------------------------------------------------ contract, every mode


def test_put_get_head_exists_delete(storage: StorageHarness) -> None:
    backend = storage.backend
    key = f"jobs/contract-{uuid.uuid4().hex[:8]}/notes/a.txt"
    data = b"hello storage"
    stored = backend.put_bytes(key, data, "text/plain")
    assert stored.info.sha256 == hashlib.sha256(data).hexdigest()
    assert not stored.pending
    assert backend.exists(key)
    assert backend.get_bytes(key) == data
    head = backend.head(key)
    assert (head.size, head.content_type, head.sha256) == (
        len(data),
        "text/plain",
        hashlib.sha256(data).hexdigest(),
    )
    backend.delete(key)
    backend.delete(key)  # deleting twice is fine
    assert not backend.exists(key)
    with pytest.raises(ObjectNotFoundError) as raised:
        backend.get_bytes(key)
    assert isinstance(raised.value, FileNotFoundError)
    with pytest.raises(ObjectNotFoundError):
        backend.head(key)


def test_put_file_and_download_verify_checksums(storage: StorageHarness, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    key = "jobs/contract/blobs/source.bin"
    info = storage.backend.put_file(key, source, "application/octet-stream").info
    assert info.size == source.stat().st_size
    copy = tmp_path / "out" / "copy.bin"
    storage.backend.download(key, copy, info.sha256)
    assert copy.read_bytes() == source.read_bytes()
    with pytest.raises(IntegrityError):
        storage.backend.download(key, tmp_path / "out" / "bad.bin", "0" * 64)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]
    with pytest.raises(FileNotFoundError):
        storage.backend.put_file("jobs/contract/x", tmp_path / "missing", "text/plain")


def test_listing_is_recursive_and_prefix_bound(storage: StorageHarness) -> None:
    for key in ["jobs/l1/a.txt", "jobs/l1/deep/er/b.txt", "jobs/l10/c.txt"]:
        storage.backend.put_bytes(key, b"x", "text/plain")
    assert storage.backend.list_keys("jobs/l1") == ["jobs/l1/a.txt", "jobs/l1/deep/er/b.txt"]
    assert storage.backend.list_keys("jobs/l1/") == ["jobs/l1/a.txt", "jobs/l1/deep/er/b.txt"]
    assert storage.backend.list_keys("jobs/none") == []


def test_presign_where_supported(storage: StorageHarness) -> None:
    backend = storage.backend
    assert isinstance(backend, SignsUrls) == storage.is_s3
    if not isinstance(backend, SignsUrls):
        return
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    signed = backend.presign("character_references/x.png", 1234)
    query = parse_qs(urlsplit(signed.url).query)
    assert query["X-Amz-Expires"] == ["1234"]
    assert signed.expires_in == 1234
    assert before + dt.timedelta(seconds=1234) <= signed.expires_at
    assert signed.expires_at <= before + dt.timedelta(seconds=1236)


# ----------------------------------------------------------------------------- local tier


def test_failed_atomic_write_leaves_old_content_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half of the new con")
        raise RuntimeError("disk went away")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


# ------------------------------------------------------------------------------- S3 only


@pytest.fixture
def moto_s3() -> Iterator[S3StorageBackend]:
    """A bare S3StorageBackend on moto's in-process S3."""
    with mock_aws():
        client = make_s3_client(region="us-east-1")
        bucket = new_bucket_name()
        client.create_bucket(Bucket=bucket)
        yield S3StorageBackend(bucket, client)


def test_listing_follows_pagination(moto_s3: S3StorageBackend) -> None:
    client = moto_s3._client
    for index in range(1003):
        client.put_object(Bucket=moto_s3.bucket, Key=f"jobs/many/{index:05d}.txt", Body=b"")
    keys = moto_s3.list_keys("jobs/many")
    assert len(keys) == 1003
    assert keys[-1] == "jobs/many/01002.txt"


def test_s3_uploads_send_checksum_and_metadata(moto_s3: S3StorageBackend) -> None:
    moto_s3.put_bytes("character_references/a.png", b"png bytes", "image/png")
    head = moto_s3._client.head_object(Bucket=moto_s3.bucket, Key="character_references/a.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"png bytes").hexdigest()


def test_s3_errors_are_translated_without_secrets(moto_s3: S3StorageBackend) -> None:
    other = S3StorageBackend("no-such-bucket-here", moto_s3._client)
    with pytest.raises(StorageError, match="NoSuchBucket") as raised:
        other.put_bytes("character_references/a.png", b"x", "image/png")
    assert "testing" not in str(raised.value)  # the fake access key never appears
    with pytest.raises(StorageError):
        other.check()


def test_multipart_upload_for_large_files(
    moto_s3: S3StorageBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.storage.s3.SINGLE_PUT_LIMIT", 5 * 1024 * 1024)
    source = tmp_path / "video.mp4"
    source.write_bytes(bytes(range(256)) * (24 * 1024 + 1))  # just over 6 MiB
    info = moto_s3.put_file("jobs/big/video.mp4", source, "video/mp4").info
    head = moto_s3.head("jobs/big/video.mp4")
    assert head.sha256 == info.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert head.content_type == "video/mp4"
    moto_s3.download("jobs/big/video.mp4", tmp_path / "copy.mp4", info.sha256)


TRICKY_KEYS = [
    "character_references/0f7e3f36-9f5c-4a8e-8a7e-2f0e4a1b2c3d.png",
    "jobs/job-1/frames/scene 01/0001 (final).png",
    "jobs/job-1/ünïcödé/ファイル.txt",
    "jobs/job-1/a+b=c&d;e,f@g!h'i*j~k$l.txt",
]


@pytest.mark.parametrize("endpoint_url", [None, "http://127.0.0.1:9000"])
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
@pytest.mark.parametrize("session_token", [None, "session-token"])
def test_presigner_matches_boto3_exactly(
    monkeypatch: pytest.MonkeyPatch,
    endpoint_url: str | None,
    region: str,
    session_token: str | None,
) -> None:
    if session_token is None:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    else:
        monkeypatch.setenv("AWS_SESSION_TOKEN", session_token)
    frozen = dt.datetime(2026, 11, 21, 12, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: frozen)
    client = make_s3_client(region=region, endpoint_url=endpoint_url)
    presigner = S3Presigner(client, "my.bucket-name")
    for key in TRICKY_KEYS:
        expected = client.generate_presigned_url(
            "get_object", Params={"Bucket": "my.bucket-name", "Key": key}, ExpiresIn=3600
        )
        signed = presigner.presign(key, 3600)
        assert signed.url == expected
        assert signed.expires_at == frozen.replace(tzinfo=dt.UTC) + dt.timedelta(hours=1)


# -------------------------------------------------------------------- S3 over real HTTP


async def test_presigned_urls_fetch_the_stored_bytes(
    s3_server: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        storage_backend="s3", storage_bucket=new_bucket_name(), aws_endpoint_url=s3_server
    )
    client = make_s3_client(region="us-east-1", endpoint_url=s3_server)
    client.create_bucket(Bucket=settings.storage_bucket)
    service = AssetPersistenceService(get_storage_backend(settings), settings=settings)
    for name, image_format, content_type in [
        ("a.png", "PNG", "image/png"),
        ("b.jpg", "JPEG", "image/jpeg"),
        ("c.webp", "WEBP", "image/webp"),
    ]:
        source = tmp_path / name
        source.write_bytes(image_bytes(image_format))
        image_id = str(uuid.uuid4())
        url = await service.persist_character_reference(image_id, source)
        assert url.startswith(s3_server + "/")
        async with httpx.AsyncClient() as http:
            response = await http.get(url)
        assert response.status_code == 200
        assert response.content == source.read_bytes()
        assert response.headers["content-type"] == content_type
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["900"]


# ------------------------------------ what ministack checks (moto 5.2.5 accepts all of it)

# A browser's request for an <img> or a link opened in a tab: no AWS headers, only the URL.
BROWSER_HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)", "Accept": "image/*,*/*;q=0.8"}


@pytest.fixture
def ministack_backend(
    ministack_endpoint: str, make_settings: Callable[..., Settings]
) -> Iterator[S3StorageBackend]:
    """The S3 tier alone, on a fresh bucket of the ministack server."""
    settings = make_settings(
        storage_backend="s3", storage_bucket=new_bucket_name(), aws_endpoint_url=ministack_endpoint
    )
    client = make_s3_client(region="us-east-1", endpoint_url=ministack_endpoint)
    client.create_bucket(Bucket=settings.storage_bucket)
    yield S3StorageBackend(settings.storage_bucket, client)


def _browser_get(url: str) -> httpx.Response:
    return httpx.get(url, headers=BROWSER_HEADERS, timeout=10)


def test_a_presigned_url_changed_signed_elsewhere_or_expired_is_refused(
    ministack_backend: S3StorageBackend,
    ministack_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"character_references/{uuid.uuid4()}.png"
    data = image_bytes()
    ministack_backend.put_bytes(key, data, "image/png")
    url = ministack_backend.presign(key, 60).url
    assert _browser_get(url).content == data

    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    changed = "0" if signature[-1] != "0" else "1"
    assert _browser_get(url.replace(signature, signature[:-1] + changed)).status_code == 403

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    elsewhere = make_s3_client(region="us-east-1", endpoint_url=ministack_endpoint)
    other_url = S3StorageBackend(ministack_backend.bucket, elsewhere).presign(key, 60).url
    assert _browser_get(other_url).status_code == 403

    # Signed an hour ago for a minute: expired now, without waiting for it.
    an_hour_ago = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: an_hour_ago)
    expired = ministack_backend.presign(key, 60).url
    assert _browser_get(expired).status_code == 403


def test_an_upload_whose_checksum_does_not_match_is_refused_and_stores_nothing(
    ministack_backend: S3StorageBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = tmp_path / "render.bin"
    source.write_bytes(b"the bytes that were hashed")
    hash_file = s3_module.sha256_file

    def hash_then_change(path: Path) -> tuple[str, int]:
        digest = hash_file(path)
        path.write_bytes(b"the bytes that were changed")  # a writer not done with the file
        return digest

    monkeypatch.setattr(s3_module, "sha256_file", hash_then_change)
    key = "jobs/checksum/renders/render.bin"
    with pytest.raises(StorageError, match="BadDigest"):
        ministack_backend.put_file(key, source, "application/octet-stream")
    assert not ministack_backend.exists(key)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until it accepts connections
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.05)
    raise RuntimeError("moto server did not start")


async def test_s3_outage_keeps_local_copy_and_uploads_it_later(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _start_server(port)
    settings = make_settings(
        storage_backend="s3",
        storage_bucket=new_bucket_name(),
        aws_endpoint_url=endpoint,
        s3_max_attempts=1,
        s3_connect_timeout=1,
    )
    inspector = make_s3_client(region="us-east-1", endpoint_url=endpoint)
    inspector.create_bucket(Bucket=settings.storage_bucket)
    server.stop()  # S3 is now unreachable

    backend = get_storage_backend(settings)
    assert isinstance(backend, WriteThroughStorageBackend)
    service = AssetPersistenceService(backend, settings=settings)
    source = tmp_path / "robot.png"
    source.write_bytes(image_bytes())
    image_id = str(uuid.uuid4())
    key = f"character_references/{image_id}.png"

    url = await service.persist_character_reference(image_id, source)

    # Nothing is lost: the local copy is there, marked pending, and served by the API.
    assert url == f"/api/mv/get_character_reference/{image_id}"
    assert (settings.output_dir / key).read_bytes() == source.read_bytes()
    assert key in list(service.pending_uploads())
    with pytest.raises(StorageUnavailableError):
        backend.remote.head(key)
    assert await service.retry_pending_uploads() == []  # still down: stays pending
    backend.close()

    # A restarted process finds the pending record and uploads once S3 is back.
    server = _start_server(port)
    try:
        restarted = get_storage_backend(settings)
        service = AssetPersistenceService(restarted, settings=settings)
        assert key in list(service.pending_uploads())
        uploaded = await service.retry_pending_uploads()
        assert key in uploaded
        assert list(service.pending_uploads()) == []
        stored = inspector.get_object(Bucket=settings.storage_bucket, Key=key)
        assert stored["Body"].read() == source.read_bytes()
        assert stored["ContentType"] == "image/png"
        presigned = await service.get_character_reference_url(image_id)
        assert presigned is not None and presigned.startswith(endpoint)
        restarted.close()
    finally:
        server.stop()


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)
def test_write_through_repairs_from_s3_when_local_copy_is_damaged(
    storage: StorageHarness, tmp_path: Path
) -> None:
    assert isinstance(storage.backend, WriteThroughStorageBackend)
    data = b"the real bytes"
    info = storage.backend.put_bytes("jobs/repair/a.bin", data, "application/octet-stream").info
    (storage.settings.output_dir / "jobs/repair/a.bin").write_bytes(b"bit rot")
    storage.backend.download("jobs/repair/a.bin", tmp_path / "a.bin", info.sha256)
    assert (tmp_path / "a.bin").read_bytes() == data


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)
def test_write_through_reads_from_s3_when_not_cached(storage: StorageHarness) -> None:
    assert isinstance(storage.backend, WriteThroughStorageBackend)
    storage.backend.put_bytes("jobs/cache/a.txt", b"cached", "text/plain")
    (storage.settings.output_dir / "jobs/cache/a.txt").unlink()
    assert storage.backend.get_bytes("jobs/cache/a.txt") == b"cached"
    assert (storage.settings.output_dir / "jobs/cache/a.txt").read_bytes() == b"cached"


# ----------------------------------------------------- presigning on the loop without I/O


def _refuse_uploads(client: object) -> None:
    """Make every PutObject fail as if S3 were unreachable (a botocore event hook)."""

    def unreachable(**kwargs: object) -> None:
        raise EndpointConnectionError(endpoint_url="http://s3.unreachable")

    client.meta.events.register("before-send.s3.PutObject", unreachable)  # type: ignore[attr-defined]


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)
def test_presign_known_only_for_keys_known_to_be_in_s3(storage: StorageHarness) -> None:
    backend = storage.backend
    assert isinstance(backend, WriteThroughStorageBackend)
    key = f"character_references/{uuid.uuid4()}.png"
    assert backend.presign_known(key, 60) is None  # never seen
    backend.put_bytes(key, b"x", "image/png")
    signed = backend.presign_known(key, 60)
    assert signed is not None and urlsplit(signed.url).path.endswith(key)
    backend.delete(key)
    assert backend.presign_known(key, 60) is None

    _refuse_uploads(backend.remote._client)
    pending_key = f"character_references/{uuid.uuid4()}.png"
    assert backend.put_bytes(pending_key, b"y", "image/png").pending
    assert backend.presign_known(pending_key, 60) is None


@pytest.mark.parametrize("storage_mode", ["s3-moto"])
async def test_credentials_due_for_refresh_are_refreshed_off_the_loop(
    storage: StorageHarness, write_image: Callable[..., Path]
) -> None:
    image_id = str(uuid.uuid4())
    await storage.service.persist_character_reference(image_id, write_image())
    refreshed_on: list[str] = []

    def refresh() -> dict[str, str]:
        refreshed_on.append(threading.current_thread().name)
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        return {
            "access_key": "k2",
            "secret_key": "s2",
            "token": "t2",
            "expiry_time": expiry.isoformat(),
        }

    almost_expired = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)).isoformat()
    credentials = RefreshableCredentials.create_from_metadata(
        {"access_key": "k1", "secret_key": "s1", "token": "t1", "expiry_time": almost_expired},
        refresh_using=refresh,
        method="test",
    )
    backend = storage.backend
    assert isinstance(backend, WriteThroughStorageBackend)
    backend.remote._client._request_signer._credentials = credentials
    assert not backend.remote.signs_without_io()

    url = await storage.service.get_character_reference_url(image_id)

    assert url is not None and "X-Amz-Credential=k2" in url
    assert refreshed_on and refreshed_on[0] != threading.main_thread().name
    assert backend.remote.signs_without_io()  # fresh credentials: the next one is inline


def test_s3_client_from_settings_is_sigv4_with_bounded_retries(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        storage_backend="s3",
        storage_bucket="some-bucket",
        s3_max_attempts=4,
        s3_connect_timeout=1.5,
        aws_endpoint_url="http://127.0.0.1:9",
    )
    backend = get_storage_backend(settings)
    assert isinstance(backend, WriteThroughStorageBackend)
    config = backend.remote._client.meta.config
    assert config.signature_version == "s3v4"
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}  # first try included
    assert config.connect_timeout == 1.5
    assert backend.remote._client.meta.endpoint_url == "http://127.0.0.1:9"
    backend.close()

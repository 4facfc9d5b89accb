"""Deletes every replica sees: tombstones in the shared bucket, read by each replica.

Each test runs replicas as services in this process, each with its own local tier (its own
machine) on one bucket of a real S3 server over HTTP (moto's and ministack's). Replica A
deletes; replica B cached the image first (its bytes, metadata, thumbnail, presigned URL) and
must stop serving all of it once it has read the deletes, and never upload it again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from conftest import S3_SERVERS, new_bucket_name, s3_endpoint
from fake_replicate import png_bytes
from mv.principals import EVERYONE
from services.asset_persistence import AssetPersistenceService, CloudImage, LocalImageFile
from services.asset_persistence.references import CharacterReferenceNotFoundError
from services.asset_persistence.shared_deletes import (
    LOOKBACK_SECONDS,
    POSITION_FILE,
    TOMBSTONE_PREFIX,
    SharedDeletes,
    Tombstone,
)
from services.storage import (
    StorageUnavailableError,
    WriteThroughStorageBackend,
    character_reference_sidecar_key,
    get_storage_backend,
    job_asset_key,
    thumbnail_key,
)
from services.storage.s3 import make_s3_client


@dataclass
class Bucket:
    """One bucket on an S3 server, and the settings of a replica on it."""

    s3: Any
    name: str
    settings: Callable[..., Settings]

    def keys(self, prefix: str) -> list[str]:
        """The bucket's keys under `prefix`."""
        listed = self.s3.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]


@pytest.fixture(params=S3_SERVERS)
def bucket(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> Bucket:
    """A fresh bucket on each S3 server in turn."""
    endpoint = s3_endpoint(request, request.param)
    name = new_bucket_name()
    s3 = make_s3_client(region="us-east-1", endpoint_url=endpoint)
    s3.create_bucket(Bucket=name)

    def settings(replica: str, **overrides: Any) -> Settings:
        return make_settings(
            storage_backend="s3",
            storage_bucket=name,
            aws_endpoint_url=endpoint,
            output_dir=tmp_path / replica,
            **overrides,
        )

    return Bucket(s3, name, settings)


@pytest.fixture
def open_replica(bucket: Bucket) -> Iterator[Callable[..., AssetPersistenceService]]:
    """Start a replica (a service with its own local tier); all are closed afterwards."""
    backends: list[Any] = []

    def open_(replica: str, **overrides: Any) -> AssetPersistenceService:
        settings = bucket.settings(replica, **overrides)
        backend = get_storage_backend(settings)
        backends.append(backend)
        return AssetPersistenceService(backend, settings=settings)

    yield open_
    for backend in backends:
        backend.close()


def _tiered(service: AssetPersistenceService) -> WriteThroughStorageBackend:
    assert isinstance(service.storage, WriteThroughStorageBackend)
    return service.storage


async def _store(service: AssetPersistenceService) -> tuple[str, str]:
    image_id = str(uuid.uuid4())
    stored = await service.store_character_reference(image_id, png_bytes(3))
    return image_id, stored.key


async def _stored_on_a_pending_on_b(
    a: AssetPersistenceService, b: AssetPersistenceService
) -> tuple[str, str, SharedDeletes]:
    """An image stored by a whose sidecar b also holds, as an upload still pending on b."""
    image_id, _ = await _store(a)
    sidecar = character_reference_sidecar_key(image_id)
    _tiered(b).hold(sidecar, _tiered(a).get_bytes(sidecar), "application/json")
    assert b.shared_deletes is not None
    return image_id, sidecar, b.shared_deletes


async def _serve_everything(service: AssetPersistenceService, image_id: str) -> None:
    """Serve the image every way a client can get it, so that the replica caches it."""
    await service.read_character_reference(image_id)
    await service.get_character_reference_record(image_id)
    await service.delivery.locate(image_id, EVERYONE)
    found = await service.delivery.find(image_id, EVERYONE)
    await service.delivery.locate_thumbnail(
        found.key, found.sha256, 256, CharacterReferenceNotFoundError(image_id)
    )


async def _served_ways(service: AssetPersistenceService, image_id: str) -> list[str]:
    """The ways in which `service` still serves the image (empty: none)."""
    ways = []
    reads = {
        "bytes": service.read_character_reference(image_id),
        "metadata": service.get_character_reference_record(image_id),
        "located": service.delivery.locate(image_id, EVERYONE),
    }
    for way, read in reads.items():
        try:
            await read
        except CharacterReferenceNotFoundError:
            continue
        ways.append(way)
    try:
        found = await service.delivery.find(image_id, EVERYONE)
        await service.delivery.locate_thumbnail(
            found.key, found.sha256, 256, CharacterReferenceNotFoundError(image_id)
        )
        ways.append("thumbnail")
    except CharacterReferenceNotFoundError:
        pass
    return ways


@pytest.mark.parametrize("serve_from_cloud", [False, True], ids=["local-serving", "cloud"])
async def test_a_replica_stops_serving_what_another_deleted_once_it_reads_the_deletes(
    open_replica: Callable[..., AssetPersistenceService], serve_from_cloud: bool
) -> None:
    a = open_replica("a")
    b = open_replica("b", serve_from_cloud=serve_from_cloud)
    assert await b.catch_up_on_deletes() == 0
    image_id, key = await _store(a)
    await _serve_everything(b, image_id)
    located = await b.delivery.locate(image_id, EVERYONE)
    assert isinstance(located, CloudImage if serve_from_cloud else LocalImageFile)
    assert _tiered(b).local.exists(key)  # b holds its own copy

    await a.delete_character_reference(image_id)
    # Before it reads the deletes, b still answers from what it cached: that is the window.
    assert await _served_ways(b, image_id) == ["bytes", "metadata", "located", "thumbnail"]

    assert await b.catch_up_on_deletes() == 1
    assert await _served_ways(b, image_id) == []
    assert not _tiered(b).local.exists(key)
    assert not _tiered(b).local.exists(thumbnail_key(key, 256))
    assert not _tiered(b).local.exists(character_reference_sidecar_key(image_id))
    assert await b.catch_up_on_deletes() == 0  # each delete is applied once
    assert await a.catch_up_on_deletes() == 0  # its own delete is not read back


async def test_a_pending_upload_on_another_replica_never_brings_a_deleted_image_back(
    open_replica: Callable[..., AssetPersistenceService], bucket: Bucket
) -> None:
    a, b = open_replica("a"), open_replica("b")
    image_id, key = await _store(a)
    await _serve_everything(b, image_id)
    # b made a thumbnail that S3 did not take: it waits as a pending upload.
    thumbnail = thumbnail_key(key, 512)
    _tiered(b).hold(thumbnail, b"webp bytes", "image/webp")
    await a.delete_character_reference(image_id)

    assert await b.retry_pending_uploads() == []
    assert bucket.keys("character_references/") == []
    assert list(b.pending_uploads()) == []
    assert not _tiered(b).local.exists(thumbnail)


async def test_an_upload_that_a_delete_overtakes_is_deleted_again(
    open_replica: Callable[..., AssetPersistenceService], bucket: Bucket
) -> None:
    a, b = open_replica("a"), open_replica("b")
    image_id, _, shared = await _stored_on_a_pending_on_b(a, b)

    async def upload_after_a_delete_elsewhere() -> list[str]:
        # b has read no delete yet when it sends its copy; a deletes just before it lands.
        await a.delete_character_reference(image_id)
        return await asyncio.to_thread(_tiered(b).retry_pending)

    assert await shared.retry_pending(upload_after_a_delete_elsewhere) == []
    assert bucket.keys("character_references/") == []


async def test_deleting_a_job_evicts_its_files_elsewhere_but_not_a_newer_job_of_that_id(
    open_replica: Callable[..., AssetPersistenceService], tmp_path: Path
) -> None:
    a, b = open_replica("a"), open_replica("b")
    directory = tmp_path / "job"
    (directory / "audio").mkdir(parents=True)
    (directory / "audio" / "track.txt").write_text("take 1")
    await a.persist_job_assets("job-1", directory)
    key = job_asset_key("job-1", "audio/track.txt")
    assert _tiered(b).local_copy(key) is not None  # b fetched and cached it
    await a.delete_job_assets("job-1")
    # Written on b after the delete (S3 unreachable from b then): a new file of the same id.
    await asyncio.sleep(0.01)  # later than the tombstone, to the millisecond
    newer = job_asset_key("job-1", "audio/take2.txt")
    _tiered(b).hold(newer, b"take 2", "text/plain")

    assert await b.catch_up_on_deletes() == 1
    assert not _tiered(b).local.exists(key)
    assert _tiered(b).local_copy(key) is None
    assert list(b.pending_uploads()) == [newer]


async def test_a_replica_restarted_on_its_local_tier_applies_the_deletes_it_missed(
    open_replica: Callable[..., AssetPersistenceService],
) -> None:
    a = open_replica("a")
    b = open_replica("b")
    image_id, key = await _store(a)
    await _serve_everything(b, image_id)
    await b.catch_up_on_deletes()
    assert (_tiered(b).state_dir / POSITION_FILE).is_file()
    b.storage.close()  # b stops
    await a.delete_character_reference(image_id)

    b_again = open_replica("b")  # the same OUTPUT_DIR, with the copies b cached
    assert _tiered(b_again).local.exists(key)
    assert await b_again.catch_up_on_deletes() == 1
    assert await _served_ways(b_again, image_id) == []


async def test_a_replica_on_an_old_local_tier_with_no_position_reads_every_delete(
    open_replica: Callable[..., AssetPersistenceService], bucket: Bucket
) -> None:
    a, b = open_replica("a"), open_replica("b")
    image_id, key = await _store(a)
    await _serve_everything(b, image_id)
    b.storage.close()
    await a.delete_character_reference(image_id)
    # Tombstones older than any listing window (written long ago) still count.
    old = Tombstone("image", str(uuid.uuid4()), time.time() - 30 * 86_400)
    bucket.s3.put_object(Bucket=bucket.name, Key=old.key, Body=b"")

    b_again = open_replica("b")
    assert not (_tiered(b_again).state_dir / POSITION_FILE).exists()
    assert await b_again.catch_up_on_deletes() == 2
    assert not _tiered(b_again).local.exists(key)


async def test_a_fresh_replica_starts_from_now(
    open_replica: Callable[..., AssetPersistenceService], bucket: Bucket
) -> None:
    old = Tombstone("image", str(uuid.uuid4()), time.time() - 3600)
    bucket.s3.put_object(Bucket=bucket.name, Key=old.key, Body=b"")
    fresh = open_replica("fresh")  # nothing cached: nothing an old delete could cover
    assert await fresh.catch_up_on_deletes() == 0
    position = json.loads((_tiered(fresh).state_dir / POSITION_FILE).read_bytes())["position"]
    assert position > old.deleted_at


async def test_a_delete_stamped_by_a_slower_clock_is_still_read(
    open_replica: Callable[..., AssetPersistenceService], bucket: Bucket
) -> None:
    b = open_replica("b")
    await b.catch_up_on_deletes()
    image_id, key = await _store(b)
    await _serve_everything(b, image_id)
    # Another replica whose clock is behind this one's, by less than the look-back.
    behind = Tombstone("image", image_id, time.time() - LOOKBACK_SECONDS / 2)
    bucket.s3.put_object(Bucket=bucket.name, Key=behind.key, Body=b"")
    assert await b.catch_up_on_deletes() == 1
    assert not _tiered(b).local.exists(key)


@pytest.mark.parametrize("failing", ["list_page", "evict"])
async def test_a_failed_catch_up_loses_no_delete(
    open_replica: Callable[..., AssetPersistenceService],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    a, b = open_replica("a"), open_replica("b")
    await b.catch_up_on_deletes()
    image_id, key = await _store(a)
    await _serve_everything(b, image_id)
    await a.delete_character_reference(image_id)
    # The listing fails (S3 unreachable), or the eviction does (a disk error).
    target = _tiered(b).remote if failing == "list_page" else _tiered(b)

    def fails(*args: object) -> None:
        raise OSError("unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(target, failing, fails)
        with pytest.raises(OSError):
            await b.catch_up_on_deletes()
    assert _tiered(b).local.exists(key)
    assert await b.catch_up_on_deletes() == 1
    assert not _tiered(b).local.exists(key)


@pytest.mark.parametrize(
    "key",
    [
        f"{TOMBSTONE_PREFIX}/notatime-image-{uuid.uuid4()}",
        f"{TOMBSTONE_PREFIX}/0000000000001-video-{uuid.uuid4()}",
        f"{TOMBSTONE_PREFIX}/0000000000001-image-not-an-id",
        f"{TOMBSTONE_PREFIX}/0000000000001-job-",
    ],
)
def test_keys_that_are_not_tombstones_are_ignored(key: str) -> None:
    assert Tombstone.from_key(key) is None


def test_a_tombstone_key_round_trips_and_sorts_by_time() -> None:
    first = Tombstone("job", "job_1-a", 1_700_000_000.123)
    later = Tombstone("image", str(uuid.uuid4()), 1_700_000_001.0)
    assert Tombstone.from_key(first.key) == first
    assert Tombstone.from_key(later.key) == later
    assert first.key < later.key


async def test_a_presigned_url_signed_while_the_delete_was_read_is_not_handed_out(
    open_replica: Callable[..., AssetPersistenceService], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = open_replica("a"), open_replica("b", serve_from_cloud=True)
    image_id, key = await _store(a)
    await b.delivery.find(image_id, EVERYONE)  # b knows where the image is
    signer = _tiered(b)
    sign = signer.presign_existing
    loop = asyncio.get_running_loop()

    def sign_while_the_delete_is_applied(key_: str, expires_in: int) -> Any:
        url = sign(key_, expires_in)  # signed before the delete...
        # ...and the delete is applied (on the event loop) before the lookup ends.
        asyncio.run_coroutine_threadsafe(a.delete_character_reference(image_id), loop).result()
        asyncio.run_coroutine_threadsafe(b.catch_up_on_deletes(), loop).result()
        return url

    monkeypatch.setattr(signer, "presign_existing", sign_while_the_delete_is_applied)
    with pytest.raises(CharacterReferenceNotFoundError):
        await b.delivery.locate(image_id, EVERYONE)
    monkeypatch.setattr(signer, "presign_existing", sign)
    with pytest.raises(CharacterReferenceNotFoundError):
        await b.delivery.locate(image_id, EVERYONE)  # and nothing was remembered
    assert not signer.local.exists(key)


async def test_an_overtaking_upload_is_deleted_by_the_next_catch_up_when_this_one_fails(
    open_replica: Callable[..., AssetPersistenceService],
    bucket: Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = open_replica("a"), open_replica("b")
    image_id, sidecar, shared = await _stored_on_a_pending_on_b(a, b)
    remote = _tiered(b).remote
    list_page = remote.list_page

    async def upload_after_a_delete_then_lose_s3() -> list[str]:
        await a.delete_character_reference(image_id)
        uploaded = await asyncio.to_thread(_tiered(b).retry_pending)
        monkeypatch.setattr(remote, "list_page", unreachable)  # the check after it fails
        return uploaded

    def unreachable(*args: object) -> list[str]:
        raise StorageUnavailableError("bucket unreachable")

    await shared.retry_pending(upload_after_a_delete_then_lose_s3)
    assert bucket.keys("character_references/") == [sidecar]  # back, for now
    monkeypatch.setattr(remote, "list_page", list_page)
    await b.catch_up_on_deletes()  # the poll loop's next round
    assert bucket.keys("character_references/") == []


async def test_while_deletes_cannot_be_read_nothing_is_uploaded(
    open_replica: Callable[..., AssetPersistenceService],
    bucket: Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = open_replica("b")
    key = f"character_references/{uuid.uuid4()}.json"
    _tiered(b).hold(key, b"{}", "application/json")

    def unreachable(*args: object) -> list[str]:
        raise StorageUnavailableError("bucket unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(_tiered(b).remote, "list_page", unreachable)
        assert await b.retry_pending_uploads() == []
    assert bucket.keys("character_references/") == []
    assert list(b.pending_uploads()) == [key]
    assert await b.retry_pending_uploads() == [key]
    assert bucket.keys("character_references/") == [key]

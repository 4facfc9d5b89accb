"""Conditional writes and the records built on them: create-if-absent, replace-if-unchanged,
compare-and-swap merges, idempotency reservations and generation records, in every tier."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from config import Settings
from conftest import StorageHarness, image_bytes, new_bucket_name
from main import create_app
from mv.character_reference import GenerateCharacterReferenceRequest
from replicas import BACKEND_DIR, process_environment
from services.asset_persistence import (
    AssetPersistenceService,
    JobManifest,
    ManifestEntry,
    merge_manifest,
    utc_now,
)
from services.generation.records import GenerationRecord, GenerationRecordStore, generation_key
from services.idempotency import (
    ABANDONED_AFTER,
    IdempotencyKeyInUseError,
    IdempotencyRecord,
    IdempotencyStore,
    record_key,
)
from services.storage import StorageBackend, get_storage_backend
from services.storage.conditional import RetryPolicy, update_object
from services.storage.errors import (
    ConcurrentUpdateError,
    PreconditionFailedError,
    StorageUnavailableError,
)
from services.storage.local import LocalStorageBackend
from services.storage.s3 import make_s3_client

JSON = "application/json"

# ------------------------------------------------------------------ the primitives


def test_put_if_absent_creates_once(storage: StorageHarness) -> None:
    backend = storage.backend
    version = backend.put_if_absent("records/one.json", b'{"n": 1}', JSON)
    with pytest.raises(PreconditionFailedError):
        backend.put_if_absent("records/one.json", b'{"n": 2}', JSON)
    current = backend.get_versioned("records/one.json")
    assert (current.data, current.version) == (b'{"n": 1}', version)
    if storage.is_s3:  # S3 itself decided, and holds the first write
        assert storage.s3_object("records/one.json")["Body"].read() == b'{"n": 1}'


def test_put_if_match_replaces_only_the_version_that_was_read(storage: StorageHarness) -> None:
    backend = storage.backend
    first = backend.put_if_absent("records/two.json", b"1", JSON)
    second = backend.put_if_match("records/two.json", b"2", JSON, first)
    assert second != first
    with pytest.raises(PreconditionFailedError):  # a writer that read version 1 lost
        backend.put_if_match("records/two.json", b"stale", JSON, first)
    with pytest.raises(PreconditionFailedError):  # nothing to replace
        backend.put_if_match("records/absent.json", b"x", JSON, first)
    assert backend.get_versioned("records/two.json").data == b"2"


def test_of_twenty_threads_creating_one_key_exactly_one_wins(storage: StorageHarness) -> None:
    backend = storage.backend
    winners: list[int] = []
    start = threading.Barrier(20)

    def create(index: int) -> None:
        start.wait()
        try:
            backend.put_if_absent("records/contested.json", str(index).encode(), JSON)
        except PreconditionFailedError:
            return
        winners.append(index)

    threads = [threading.Thread(target=create, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert backend.get_versioned("records/contested.json").data == str(winners[0]).encode()


def test_compare_and_swap_counter_loses_no_increment_across_threads(
    storage: StorageHarness,
) -> None:
    def increment(raw: bytes | None) -> bytes:
        return str(int(raw or b"0") + 1).encode()

    def work() -> None:
        for _ in range(10):
            update_object(storage.backend, "records/counter", increment, content_type="text/plain")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.backend.get_versioned("records/counter").data == b"60"


_COUNTER_SCRIPT = """
import sys
from pathlib import Path
from services.storage.conditional import RetryPolicy, update_object
from services.storage.local import LocalStorageBackend
backend = LocalStorageBackend(Path(sys.argv[1]))
for _ in range(25):
    update_object(backend, "records/counter", lambda raw: str(int(raw or b"0") + 1).encode(),
                  retry=RetryPolicy(attempts=1000))
"""


def test_local_tier_compare_and_swap_holds_across_processes(tmp_path: Path) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _COUNTER_SCRIPT, str(tmp_path)],
            cwd=BACKEND_DIR,
            env=process_environment({}),
        )
        for _ in range(4)
    ]
    assert [process.wait(timeout=120) for process in processes] == [0] * 4
    assert (tmp_path / "records" / "counter").read_bytes() == b"100"
    assert not list(tmp_path.rglob(".tmp-*"))  # no unfinished write left behind


def test_a_record_that_keeps_changing_gives_up_after_the_bounded_attempts(tmp_path: Path) -> None:
    backend = LocalStorageBackend(tmp_path)
    backend.put_if_absent("records/hot.json", b"0", JSON)
    attempts = 0

    def change_and_race(raw: bytes | None) -> bytes:
        nonlocal attempts
        attempts += 1
        backend.put_bytes("records/hot.json", str(attempts).encode(), JSON)  # another writer
        return b"mine"

    with pytest.raises(ConcurrentUpdateError, match=r"records/hot\.json"):
        update_object(
            backend,
            "records/hot.json",
            change_and_race,
            retry=RetryPolicy(attempts=5),
            sleep=_no_wait,
        )
    assert attempts == 5
    assert backend.get_bytes("records/hot.json") == b"5"  # never overwritten by the loser


def _no_wait(_: float) -> None:
    pass


# --------------------------------------------------- merges: any interleaving, the union


def _entry(path: str) -> ManifestEntry:
    return ManifestEntry(
        path=path, category="renders", size=1, sha256="0" * 64, content_type="text/plain"
    )


class _MergingWriter:
    """One writer's merges, one storage call per step, so a schedule can interleave them."""

    def __init__(self, backend: StorageBackend, key: str, paths: list[str]) -> None:
        self.backend, self.key, self.todo = backend, key, list(paths)
        self.pending: tuple[bytes, str | None] | None = None  # what the next write sends

    @property
    def done(self) -> bool:
        return not self.todo

    def step(self) -> None:
        if self.pending is None:  # read, and compute the merge
            try:
                current = self.backend.get_versioned(self.key)
            except FileNotFoundError:
                current = None
            manifest = None if current is None else JobManifest.model_validate_json(current.data)
            merged = merge_manifest(manifest, "job", [_entry(self.todo[0])]) or manifest
            assert merged is not None
            version = None if current is None else current.version
            self.pending = (merged.model_dump_json().encode(), version)
            return
        data, version = self.pending
        self.pending = None
        try:
            if version is None:
                self.backend.put_if_absent(self.key, data, JSON)
            else:
                self.backend.put_if_match(self.key, data, JSON, version)
        except PreconditionFailedError:
            return  # lost the race: read again
        self.todo.pop(0)


@pytest.fixture(params=["local", "s3-moto"])
def merge_backend(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> Any:
    """A backend for the interleaving property, in each tier."""
    if request.param == "local":
        yield LocalStorageBackend(make_settings().output_dir)
        return
    from moto import mock_aws

    with mock_aws():
        settings = make_settings(storage_backend="s3", storage_bucket=new_bucket_name())
        make_s3_client(region="us-east-1").create_bucket(Bucket=settings.storage_bucket)
        backend = get_storage_backend(settings)
        yield backend
        backend.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    writers=st.lists(st.integers(min_value=1, max_value=4), min_size=2, max_size=4),
    schedule=st.lists(st.integers(min_value=0, max_value=3), max_size=200),
)
def test_any_interleaving_of_merges_from_several_writers_ends_with_the_union(
    merge_backend: StorageBackend, writers: list[int], schedule: list[int]
) -> None:
    key = f"jobs/j{uuid.uuid4().hex}/manifest.json"  # a fresh record per example
    machines = [
        _MergingWriter(merge_backend, key, [f"w{writer}/file{n}" for n in range(count)])
        for writer, count in enumerate(writers)
    ]
    for choice in schedule:  # the interleaving hypothesis chose...
        active = [machine for machine in machines if not machine.done]
        if not active:
            break
        active[choice % len(active)].step()
    for machine in machines:  # ...then whatever is left, in turn
        while not machine.done:
            machine.step()
    manifest = JobManifest.model_validate_json(merge_backend.get_versioned(key).data)
    expected = {f"w{writer}/file{n}" for writer, count in enumerate(writers) for n in range(count)}
    assert {entry.path for entry in manifest.files} == expected


# ------------------------------------------- pending uploads never replace newer objects


def _s3_pair(make_settings: Callable[..., Settings], endpoint: str) -> tuple[Any, Any, Settings]:
    settings = make_settings(
        storage_backend="s3", storage_bucket=new_bucket_name(), aws_endpoint_url=endpoint
    )
    s3 = make_s3_client(region="us-east-1", endpoint_url=endpoint)
    s3.create_bucket(Bucket=settings.storage_bucket)
    return get_storage_backend(settings), s3, settings


def test_a_pending_upload_does_not_replace_what_another_replica_stored(
    make_settings: Callable[..., Settings], s3_server: str
) -> None:
    backend, s3, settings = _s3_pair(make_settings, s3_server)
    key = "jobs/job-1/renders/shot.bin"
    backend.hold(key, b"written here while S3 was unreachable", "application/octet-stream")
    s3.put_object(Bucket=settings.storage_bucket, Key=key, Body=b"stored later by another replica")

    assert backend.retry_pending() == [key]
    stored = s3.get_object(Bucket=settings.storage_bucket, Key=key)["Body"].read()
    assert stored == b"stored later by another replica"
    assert not backend.is_pending(key)
    assert backend.get_bytes(key) == b"stored later by another replica"  # no stale local copy
    backend.close()


def test_a_pending_manifest_is_merged_into_the_one_another_replica_stored(
    make_settings: Callable[..., Settings], s3_server: str
) -> None:
    backend, s3, settings = _s3_pair(make_settings, s3_server)
    assets = AssetPersistenceService(backend, settings=settings)
    key = "jobs/job-2/manifest.json"
    mine = JobManifest(job_id="job-2", files=[_entry("renders/a.bin"), _entry("renders/b.bin")])
    backend.hold(key, mine.model_dump_json().encode(), JSON)
    theirs = JobManifest(job_id="job-2", files=[_entry("renders/c.bin")])
    s3.put_object(Bucket=settings.storage_bucket, Key=key, Body=theirs.model_dump_json().encode())

    assert asyncio.run(assets.retry_pending_uploads()) == [key]
    stored = json.loads(s3.get_object(Bucket=settings.storage_bucket, Key=key)["Body"].read())
    assert [entry["path"] for entry in stored["files"]] == [
        "renders/a.bin",
        "renders/b.bin",
        "renders/c.bin",
    ]
    backend.close()


# --------------------------------------------------------------- generation records


def _record(status: str) -> GenerationRecord:
    return GenerationRecord(
        generation_id="6f0c1f9e-4a51-4f3e-9d51-6c1a1c0b5d11",
        status=status,  # type: ignore[arg-type]
        request=GenerateCharacterReferenceRequest(character_description="a fox"),
        instance="replica-a",
    )


def test_a_finished_generation_record_is_never_overwritten_by_a_late_save(
    tmp_path: Path,
) -> None:
    records = GenerationRecordStore(LocalStorageBackend(tmp_path), "replica-a")

    async def scenario() -> GenerationRecord | None:
        assert await records.save(_record("queued"))
        assert await records.save(_record("succeeded"))
        assert not await records.save(_record("running"))  # late: refused, quietly
        assert not await records.save(_record("failed"))  # the first finish stands
        return await records.load(_record("queued").generation_id)

    stored = asyncio.run(scenario())
    assert stored is not None and stored.status == "succeeded"


class _DiesBeforeTheMarker(LocalStorageBackend):
    """A store whose process dies (here: the write fails) when it writes an active marker."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> Any:
        if "/active/" in key:
            raise StorageUnavailableError("the process died here")
        return super().put_bytes(key, data, content_type)


def test_a_new_generation_is_never_stored_without_the_marker_that_finds_it_after_a_crash(
    tmp_path: Path,
) -> None:
    storage = _DiesBeforeTheMarker(tmp_path)
    records = GenerationRecordStore(storage, "replica-a")
    with pytest.raises(StorageUnavailableError):
        asyncio.run(records.save(_record("queued")))
    # No record at all: none that a restart could not find and mark failed.
    assert not storage.exists(generation_key(_record("queued").generation_id))


def test_a_generation_queued_again_is_saved_as_queued(tmp_path: Path) -> None:
    records = GenerationRecordStore(LocalStorageBackend(tmp_path), "replica-a")
    record = _record("queued")

    async def scenario() -> GenerationRecord | None:
        assert await records.save(record)
        record.status, record.started_at = "running", utc_now()
        assert await records.save(record)
        record.status = "queued"  # shed by the worker tier: it waits for room
        assert await records.save(record)
        return await records.load(record.generation_id)

    stored = asyncio.run(scenario())
    assert stored is not None and stored.status == "queued"
    assert stored.started_at is not None


# ------------------------------------------------------------------- idempotency keys


def _plant_reservation(backend: StorageBackend, scope: str, key: str, age: timedelta) -> None:
    from services.idempotency import fingerprint

    record = IdempotencyRecord(
        scope=scope, fingerprint=fingerprint({"a": 1}), created_at=utc_now() - age
    )
    backend.put_bytes(record_key(scope, key), record.model_dump_json().encode(), JSON)


def test_a_request_waits_for_a_reservation_and_then_says_the_key_is_in_use(
    tmp_path: Path,
) -> None:
    backend = LocalStorageBackend(tmp_path)
    _plant_reservation(backend, "jobs", "key-1", timedelta(seconds=1))  # another replica's
    store = IdempotencyStore(backend, wait_seconds=0.3)

    async def scenario() -> None:
        async with store.reserve("jobs", "key-1", {"a": 1}):
            pass

    with pytest.raises(IdempotencyKeyInUseError):
        asyncio.run(scenario())


def test_a_reservation_whose_owner_died_is_taken_over(tmp_path: Path) -> None:
    backend = LocalStorageBackend(tmp_path)
    _plant_reservation(backend, "jobs", "key-2", ABANDONED_AFTER + timedelta(seconds=1))
    store = IdempotencyStore(backend, wait_seconds=0.3)

    async def scenario() -> str | None:
        async with store.reserve("jobs", "key-2", {"a": 1}) as slot:
            assert slot.existing is None  # this request owns the key now
            slot.record("job-new")
        async with store.reserve("jobs", "key-2", {"a": 1}) as replay:
            return replay.existing

    assert asyncio.run(scenario()) == "job-new"


def test_a_failed_request_releases_its_key_for_a_retry(tmp_path: Path) -> None:
    backend = LocalStorageBackend(tmp_path)
    store = IdempotencyStore(backend, wait_seconds=0.3)

    async def scenario() -> None:
        with pytest.raises(RuntimeError):
            async with store.reserve("jobs", "key-3", {"a": 1}):
                raise RuntimeError("creating the resource failed")
        assert not backend.exists(record_key("jobs", "key-3"))  # released
        async with store.reserve("jobs", "key-3", {"a": 1}) as retry:
            assert retry.existing is None  # the retry owns the key and creates
            retry.record("job-retried")

    asyncio.run(scenario())
    stored = json.loads(backend.get_bytes(record_key("jobs", "key-3")))
    assert stored["resource_id"] == "job-retried"


# ------------------------------------------------------------------ errors at the API


class _ManifestAlwaysChanging:
    """Local storage where every conditional write of a job manifest loses a race.

    Another writer winning sixteen times in a row cannot be arranged on demand with real
    processes; the refusal itself is the store's real PreconditionFailedError.
    """

    def __init__(self, inner: LocalStorageBackend) -> None:
        self._inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str:
        if key.endswith("manifest.json"):
            raise PreconditionFailedError(key)
        return self._inner.put_if_absent(key, data, content_type)

    def put_if_match(self, key: str, data: bytes, content_type: str, version: str) -> str:
        if key.endswith("manifest.json"):
            raise PreconditionFailedError(key)
        return self._inner.put_if_match(key, data, content_type, version)


def test_a_manifest_that_keeps_changing_is_a_503_with_retry_after(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(image_generator="replicate", replicate_api_token="r8_test")
    storage = _ManifestAlwaysChanging(LocalStorageBackend(settings.output_dir))
    with TestClient(create_app(settings, storage_backend=storage)) as client:  # type: ignore[arg-type]
        assert client.post("/api/mv/jobs", json={"job_id": "hot-job"}).status_code == 201
        uploaded = client.post(
            "/api/mv/upload_character_reference",
            files={"file": ("a.png", image_bytes(), "image/png")},
        ).json()
        reply = client.post(
            "/api/mv/jobs/hot-job/character_references", json={"image_ids": [uploaded["id"]]}
        )
    assert reply.status_code == 503
    assert reply.headers["Retry-After"] == "1"
    assert reply.json()["detail"]["error"] == "ConcurrentUpdate"
    assert "manifest.json" in reply.json()["detail"]["message"]

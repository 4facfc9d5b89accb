"""Faults: S3 stopping mid-persist or answering slowly, Replicate failing for good, the GPU
running out of memory again and again, and the process being killed mid-write.

S3 is moto's real HTTP server behind `FaultyProxy`; Replicate is its real client against the
fake HTTP layer; the local generator is the tiny pipeline with CUDA's out-of-memory error
injected (it cannot happen on a CPU).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import (
    API_S3_MODES,
    ApiHarness,
    BlockingGenerator,
    blocks_png,
    image_bytes,
    out_of_memory_loader,
    s3_endpoint,
    wait_until,
)
from fake_replicate import FakeReplicate
from faulty_proxy import FaultyProxy
from services.storage.atomic import TEMP_PREFIX, remove_abandoned_temp_files
from services.storage.local import LocalStorageBackend

BACKEND_DIR = Path(__file__).resolve().parents[1]
GENERATE = "/api/mv/generate_character_reference"
UPLOAD = "/api/mv/upload_character_reference"


@pytest.fixture(params=list(API_S3_MODES))
def s3_mode(request: pytest.FixtureRequest) -> str:
    """make_api's S3 mode on each of the session's S3 servers."""
    return request.param


@pytest.fixture
def s3_proxy(s3_mode: str, request: pytest.FixtureRequest) -> Iterator[FaultyProxy]:
    """A proxy in front of the S3 server of `s3_mode`, up and fast."""
    upstream = s3_endpoint(request, API_S3_MODES[s3_mode])
    proxy = FaultyProxy(urlsplit(upstream).port or 0)
    proxy.start()
    yield proxy
    proxy.close()


def pending_uploads(api: ApiHarness) -> list[str]:
    """The keys the app still holds locally for upload."""
    return list(api.client.app.state.assets.pending_uploads())


# ------------------------------------------------------------------------------- S3 stops


def test_s3_stopping_mid_persist_loses_nothing_and_catches_up(
    make_api: Callable[..., ApiHarness], s3_mode: str, s3_proxy: FaultyProxy, tmp_path: Path
) -> None:
    api = make_api(
        s3_mode,
        aws_endpoint_url=s3_proxy.endpoint,
        s3_max_attempts=1,
        s3_connect_timeout=1,
        storage_max_concurrency=1,  # one upload at a time: the stop lands between two files
        pending_upload_retry_seconds=1,
    )
    assert api.client.post("/api/mv/jobs", json={"job_id": "stopped-job"}).status_code == 201
    job_dir = tmp_path / "job"
    files = {f"renders/take{index:02d}.bin": os.urandom(50_000) for index in range(12)}
    for relative, data in files.items():
        (job_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / relative).write_bytes(data)

    uploads = 0

    def stop_s3_after_four_uploads(**_: object) -> None:
        nonlocal uploads
        uploads += 1
        if uploads == 4:
            s3_proxy.stop()

    # The app's own S3 client, so the stop happens right after its fourth upload lands.
    s3_client = api.client.app.state.assets.storage.remote._client
    s3_client.meta.events.register("after-call.s3.PutObject", stop_s3_after_four_uploads)
    assets = api.client.app.state.assets
    result = api.client.portal.call(assets.persist_job_assets, "stopped-job", job_dir)

    assert len(result["renders"]) == 12  # every file got a URL: nothing was refused
    pending = pending_uploads(api)
    assert len(pending) == 12 - 4 + 1  # four landed before the stop; plus the manifest
    assert "jobs/stopped-job/manifest.json" in pending
    metrics = api.client.get("/metrics").text
    assert "mv_pending_uploads 9.0" in metrics

    # While S3 is down, every file is still served, from the local copy.
    reply = api.client.get("/api/mv/jobs/stopped-job")
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert sorted(asset["path"] for asset in job["assets"]) == sorted(files)
    for relative, data in files.items():
        served = api.client.get(f"/api/mv/jobs/stopped-job/assets/{relative}")
        assert served.status_code == 200
        assert served.content == data

    s3_proxy.start()  # S3 is back: the background retry uploads the rest
    wait_until(lambda: not pending_uploads(api))
    bucket = api.settings.storage_bucket
    for relative, data in files.items():
        stored = api.s3.get_object(Bucket=bucket, Key=f"jobs/stopped-job/{relative}")
        assert stored["Body"].read() == data
    manifest = json.loads(
        api.s3.get_object(Bucket=bucket, Key="jobs/stopped-job/manifest.json")["Body"].read()
    )
    assert {entry["path"]: entry["sha256"] for entry in manifest["files"]} == {
        relative: hashlib.sha256(data).hexdigest() for relative, data in files.items()
    }


# ------------------------------------------------------------------------------- slow S3


def test_slow_s3_fails_cleanly_within_its_timeout_and_no_worker_hangs(
    make_api: Callable[..., ApiHarness], s3_mode: str, s3_proxy: FaultyProxy
) -> None:
    settings = dict(
        aws_endpoint_url=s3_proxy.endpoint,
        s3_max_attempts=2,
        s3_connect_timeout=0.5,
        s3_read_timeout=0.5,
        storage_max_concurrency=2,
        pending_upload_retry_seconds=1,
    )
    writer = make_api(s3_mode, **settings)
    stored = {}
    for _ in range(3):
        data = image_bytes()
        stored[writer.client.post(UPLOAD, files={"file": ("a.png", data)}).json()["id"]] = data
    # A second replica on the same bucket: it has no local copies, so it must ask S3.
    reader = make_api(
        s3_mode,
        storage_bucket=writer.settings.storage_bucket,
        output_dir=writer.settings.output_dir.parent / "replica-2",
        **settings,
    )

    s3_proxy.delay = 3.0  # every S3 reply takes longer than the read timeout
    image_id = next(iter(stored))
    start = time.monotonic()
    reply = reader.client.get(f"/api/mv/get_character_reference/{image_id}")
    elapsed = time.monotonic() - start
    assert reply.status_code == 503
    assert reply.json()["detail"]["error"] == "StorageUnavailable"
    assert "Traceback" not in reply.text
    assert elapsed < 2 * (0.5 + 0.5) + 2.0  # two attempts of a 0.5 s read timeout, and slack

    # A write while S3 is slow keeps its local copy and is answered.
    late = image_bytes()
    start = time.monotonic()
    reply = reader.client.post(UPLOAD, files={"file": ("late.png", late)})
    assert reply.status_code == 201
    assert time.monotonic() - start < 2 * (0.5 + 0.5) + 2.0
    late_id = reply.json()["id"]
    assert f"character_references/{late_id}.png" in pending_uploads(reader)

    # S3 is fast again: more concurrent reads than storage workers all complete, so no worker
    # was left stuck on the slow replies, and the pending write is uploaded.
    s3_proxy.delay = 0.0
    ids = list(stored) * 4
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda i: reader.client.get(f"/api/mv/get_character_reference/{i}"), ids)
        )
    assert [r.status_code for r in replies] == [200] * len(ids)
    assert [r.content for r in replies] == [stored[i] for i in ids]
    wait_until(lambda: not pending_uploads(reader))
    key = f"character_references/{late_id}.png"
    stored_late = writer.s3.get_object(Bucket=writer.settings.storage_bucket, Key=key)
    assert stored_late["Body"].read() == late


# ------------------------------------------------------------------------- Replicate down


def test_replicate_failing_for_good_gives_a_502_after_bounded_retries(
    make_api: Callable[..., ApiHarness],
) -> None:
    fake = FakeReplicate()
    api = make_api("local", image_generator="replicate", replicate=fake, replicate_max_attempts=3)
    generator = api.client.app.state.generation.generators["replicate"]
    generator.backoff_base = 0.01
    fake.create_replies = [httpx.Response(503, json={"detail": "down"})] * 1000

    reply = api.client.post(GENERATE, json={"character_description": "a singer", "num_images": 1})
    assert reply.status_code == 502
    assert reply.json()["detail"]["error"] == "ProviderError"
    assert "after 3 attempt(s)" in reply.json()["detail"]["message"]
    assert len(fake.prediction_posts) == 3  # tried exactly REPLICATE_MAX_ATTEMPTS times


def test_one_image_refused_stops_its_siblings_retrying(
    make_api: Callable[..., ApiHarness],
) -> None:
    fake = FakeReplicate()
    api = make_api("local", image_generator="replicate", replicate=fake, replicate_max_attempts=10)
    generator = api.client.app.state.generation.generators["replicate"]
    generator.backoff_base = 0.05
    # The first prediction is refused outright; the other three get 503s to retry on.
    fake.create_replies = [httpx.Response(422, json={"detail": "bad input", "title": "Invalid"})]
    fake.create_replies += [httpx.Response(503)] * 1000

    reply = api.client.post(GENERATE, json={"character_description": "a singer", "num_images": 4})
    assert reply.status_code == 502
    posts_at_reply = len(fake.prediction_posts)
    time.sleep(0.5)  # long enough for several more backoff rounds, were any still running
    assert len(fake.prediction_posts) == posts_at_reply

    def retry_tasks() -> list[str]:
        return [
            task.get_coro().__qualname__
            for task in asyncio.all_tasks()
            if "counted" in task.get_coro().__qualname__
        ]

    async def leftover() -> list[str]:
        return retry_tasks()

    assert api.client.portal.call(leftover) == []

    # Replicate recovers: the next request runs at once and needs one call per image.
    fake.create_replies = []
    before = len(fake.prediction_posts)
    reply = api.client.post(GENERATE, json={"character_description": "a singer", "num_images": 4})
    assert reply.status_code == 200
    assert len(fake.prediction_posts) - before == 4


# ---------------------------------------------------------------------- out of GPU memory


def test_repeated_out_of_memory_falls_back_and_readiness_reports_it(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(
        "local",
        image_generator="auto",
        replicate=FakeReplicate(),
        local_loader=out_of_memory_loader,
    )
    for attempt in range(1, 4):
        assert api.client.get("/ready").json()["status"] == "ready"
        reply = api.client.post(
            GENERATE, json={"character_description": "a singer", "num_images": 1}
        )
        assert reply.status_code == 200
        body = reply.json()
        assert body["metadata"]["backend"] == "replicate"
        assert "ran out of memory" in body["metadata"]["fallback_reason"], attempt

    ready = api.client.get("/ready")
    assert ready.status_code == 200  # it still works, through the fallback
    assert ready.json() == {
        "status": "degraded",
        "problems": [],
        "warnings": [
            "local: out of memory on the last 3 generations; requests fall back to replicate"
        ],
        "reference_images": {"local": 0, "replicate": 4},  # SDXL-Turbo; klein on Replicate
    }


def test_out_of_memory_without_a_fallback_fails_each_request_and_readiness_reports_it(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api("local", image_generator="local", local_loader=out_of_memory_loader)
    for _ in range(3):
        reply = api.client.post(
            GENERATE, json={"character_description": "a singer", "num_images": 2}
        )
        assert reply.status_code == 503
        assert "ran out of memory generating 2 image(s)" in reply.json()["detail"]["message"]
    ready = api.client.get("/ready").json()
    assert ready["status"] == "degraded"
    assert ready["warnings"] == ["local: out of memory on the last 3 generations; requests fail"]


# --------------------------------------------------------------- killed during a local write

_WRITER = """
import sys
from pathlib import Path
from services.storage.local import LocalStorageBackend

storage = LocalStorageBackend(Path(sys.argv[1]))
storage.put_file("jobs/killed/render.bin", Path(sys.argv[2]), "application/octet-stream")
"""


def test_a_process_killed_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    source = tmp_path / "source.fifo"
    os.mkfifo(source)  # the writer reads its source from here, so it stalls mid-copy
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), str(source)],
        cwd=BACKEND_DIR,
        env={**os.environ, "PYTHONPATH": str(BACKEND_DIR)},
    )
    with source.open("wb") as feed:
        feed.write(os.urandom(3 * 1024 * 1024))
        feed.flush()
        temp_dir = root / "jobs" / "killed"
        wait_until(lambda: any(temp_dir.glob(f"{TEMP_PREFIX}*")), timeout=30)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)

    final = temp_dir / "render.bin"
    assert not final.exists()  # the reader never sees a half-written object
    storage = LocalStorageBackend(root)
    assert storage.list_keys("jobs/") == []
    assert not storage.exists("jobs/killed/render.bin")
    # The temp file of the dead writer is swept away; nothing partial remains on disk.
    removed = remove_abandoned_temp_files(root)
    assert len(removed) == 1
    assert [path for path in temp_dir.iterdir()] == []


def test_the_server_sweeps_temp_files_of_dead_writers_at_start(
    make_api: Callable[..., ApiHarness], tmp_path: Path
) -> None:
    root = tmp_path / "outputs" / "jobs" / "j"
    root.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    abandoned = root / f"{TEMP_PREFIX}{dead.stdout.strip()}-abc123"
    abandoned.write_bytes(b"half an image")
    live = root / f"{TEMP_PREFIX}{os.getppid()}-def456"
    live.write_bytes(b"a write still in progress")
    make_api("local")
    wait_until(lambda: not abandoned.exists(), timeout=10)
    assert live.exists()  # its writer is alive: left alone


def test_a_reference_whose_upload_is_pending_is_read_from_the_local_copy(
    make_api: Callable[..., ApiHarness], s3_mode: str, s3_proxy: FaultyProxy
) -> None:
    blocking = BlockingGenerator()
    blocking.release.set()
    api = make_api(
        s3_mode,
        aws_endpoint_url=s3_proxy.endpoint,
        s3_max_attempts=1,
        s3_connect_timeout=1,
        pending_upload_retry_seconds=3600,
        image_generator="replicate",
        generators={"replicate": blocking},
    )
    s3_proxy.stop()
    reference = blocks_png(4)
    uploaded = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("r.png", reference, "image/png")}
    )
    assert uploaded.status_code == 201, uploaded.text
    reference_id = uploaded.json()["id"]
    assert f"character_references/{reference_id}.png" in pending_uploads(api)
    s3_proxy.start()  # back, but the reference stays pending until the next retry (an hour)
    body = {
        "character_description": "the same character",
        "reference_image_ids": [reference_id],
        "views": ["front", "back"],
    }
    reply = api.client.post("/api/mv/generate_character_reference", json=body)
    assert reply.status_code == 200, reply.text
    (sent,) = blocking.requests[0].references
    # The local copy; and no presigned URL, which would point at an object not yet in S3.
    assert sent.data == reference and sent.url is None
    assert f"character_references/{reference_id}.png" in pending_uploads(api)

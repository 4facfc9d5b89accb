"""Two API processes on one storage tier lose nothing: real uvicorn processes, real HTTP.

Each mode runs two replicas (separate processes and ports) that share only the storage:
- S3: one bucket on the moto server, each replica with its own local tier (its own machine);
- local: one OUTPUT_DIR on one disk.
Generations run on a worker tier over real HTTP (a paced fake of its protocol), so that a
generation can be made to last long enough to be canceled from the other replica.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import wait_until
from fake_worker import TOKEN, PacedWorker
from live_server import serve
from replicas import (
    BACKEND_DIR,
    OFFLINE_AWS,
    Replica,
    SharedTier,
    open_shared_tier,
    process_environment,
    run_replicas,
)


@dataclass
class Pair:
    """Two replicas on one storage tier, and that tier."""

    mode: str
    replicas: list[Replica]
    tier: SharedTier
    worker: PacedWorker


@pytest.fixture(scope="module")
def paced_worker() -> Iterator[tuple[PacedWorker, str]]:
    """The worker tier both replicas call, over real HTTP on loopback."""
    worker = PacedWorker()
    with serve(worker.app()) as url:
        yield worker, url


@pytest.fixture(scope="module", params=["s3", "s3-ministack", "local"])
def pair(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    paced_worker: tuple[PacedWorker, str],
) -> Iterator[Pair]:
    """Two replicas, started once per storage mode for the module's tests."""
    with contextlib.ExitStack() as stack:
        yield from _start_pair(request, tmp_path_factory, paced_worker, stack)


def _start_pair(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    paced_worker: tuple[PacedWorker, str],
    stack: contextlib.ExitStack,
) -> Iterator[Pair]:
    worker, worker_url = paced_worker
    base = tmp_path_factory.mktemp(f"replicas-{request.param}")
    common = {
        "IMAGE_GENERATOR": "worker",
        "WORKER_URL": worker_url,
        "WORKER_TOKEN": TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    environment = stack.enter_context(pytest.MonkeyPatch.context())
    for name, value in OFFLINE_AWS.items():  # for this module's own S3 client
        environment.setenv(name, value)
    tier = open_shared_tier(request, request.param, base)
    settings = {
        name: {**common, **tier.for_machine(base / name)} for name in ("replica-a", "replica-b")
    }
    replicas = stack.enter_context(run_replicas(settings, base))
    yield Pair(request.param, replicas, tier, worker)


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (index % 256, index // 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def _all_at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run every call on its own thread, released together."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        start.wait()
        return call()

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_attaches_and_a_worker_persist_lose_nothing(pair: Pair, tmp_path: Path) -> None:
    job_id = f"crowded-{pair.mode}"
    a, b = pair.replicas
    assert httpx.post(a.url + "/api/mv/jobs", json={"job_id": job_id}).status_code == 201
    images = {}
    for index in range(40):
        replica = pair.replicas[index % 2]
        reply = httpx.post(
            replica.url + "/api/mv/upload_character_reference",
            files={"file": (f"{index}.png", _png(index), "image/png")},
        )
        assert reply.status_code == 201, reply.text
        images[reply.json()["id"]] = _png(index)
    job_dir = tmp_path / "job"
    files = {f"renders/shot{index:02d}.bin": os.urandom(20_000) for index in range(10)}
    files["audio/track.wav"] = os.urandom(30_000)
    for relative, data in files.items():
        (job_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / relative).write_bytes(data)
    cli_settings = pair.tier.for_machine(tmp_path / "worker-cli")  # a worker machine's disk

    persist = subprocess.Popen(
        [sys.executable, "-m", "tools.job_assets", "persist", job_id, str(job_dir)],
        cwd=BACKEND_DIR,
        env=process_environment(cli_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    replies = _all_at_once(
        [
            lambda image_id=image_id, index=index: httpx.post(
                f"{pair.replicas[index % 2].url}/api/mv/jobs/{job_id}/character_references",
                json={"image_ids": [image_id]},
                timeout=60,
            )
            for index, image_id in enumerate(images)
        ]
    )
    out, err = persist.communicate(timeout=120)
    assert persist.returncode == 0, err.decode()
    assert [reply.status_code for reply in replies] == [200] * 40, [r.text for r in replies]

    for replica in (a, b):
        job = httpx.get(f"{replica.url}/api/mv/jobs/{job_id}").json()
        assert {ref["image_id"] for ref in job["character_references"]} == set(images)
        listed = {asset["path"]: asset["sha256"] for asset in job["assets"]}
        for relative, data in files.items():
            assert listed[relative] == hashlib.sha256(data).hexdigest()
    manifest = json.loads(pair.tier.read(f"jobs/{job_id}/manifest.json"))
    assert len(manifest["files"]) == 40 + len(files)
    for entry in manifest["files"]:  # every entry names a stored object with that content
        stored = pair.tier.read(f"jobs/{job_id}/{entry['path']}")
        assert hashlib.sha256(stored).hexdigest() == entry["sha256"]
    for image_id, data in images.items():
        path = f"character_reference/{image_id}.png"
        assert pair.tier.read(f"jobs/{job_id}/{path}") == data
    assert json.loads(out)["manifest"]


def test_concurrent_creates_of_one_job_id_give_exactly_one_201(pair: Pair) -> None:
    job_id = f"contested-{pair.mode}"
    replies = _all_at_once(
        [
            lambda index=index: httpx.post(
                pair.replicas[index % 2].url + "/api/mv/jobs",
                json={"job_id": job_id, "metadata": {"writer": index}},
                timeout=30,
            )
            for index in range(20)
        ]
    )
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [201] + [409] * 19, statuses
    for reply in replies:
        if reply.status_code == 409:
            assert reply.json()["detail"]["error"] == "JobExists"
    winner = next(reply for reply in replies if reply.status_code == 201).json()
    record = json.loads(pair.tier.read(f"job_records/{job_id}.json"))
    assert record["metadata"] == winner["metadata"]  # the stored record is the winner's


def test_one_idempotency_key_on_both_replicas_runs_one_generation(pair: Pair) -> None:
    worker = pair.worker
    before = worker.generate_calls
    key = str(uuid.uuid4())
    body = {"character_description": "a red fox in a blue coat", "num_images": 1, "seed": 5}
    replies = _all_at_once(
        [
            lambda replica=replica: httpx.post(
                replica.url + "/api/mv/character_reference_jobs",
                json=body,
                headers={"Idempotency-Key": key},
                timeout=60,
            )
            for replica in pair.replicas
        ]
    )
    assert [reply.status_code for reply in replies] == [202, 202], [r.text for r in replies]
    generation_ids = {reply.json()["generation_id"] for reply in replies}
    assert len(generation_ids) == 1
    (generation_id,) = generation_ids
    for replica in pair.replicas:
        status_url = f"{replica.url}/api/mv/character_reference_jobs/{generation_id}"
        wait_until(lambda url=status_url: httpx.get(url).json()["status"] == "succeeded")

    # The sync route too: both replies name the same generation and carry the same images.
    key = str(uuid.uuid4())
    replies = _all_at_once(
        [
            lambda replica=replica: httpx.post(
                replica.url + "/api/mv/generate_character_reference",
                json={**body, "include_base64": False},
                headers={"Idempotency-Key": key},
                timeout=60,
            )
            for replica in pair.replicas
        ]
    )
    assert [reply.status_code for reply in replies] == [200, 200], [r.text for r in replies]
    assert len({reply.headers["X-Generation-Id"] for reply in replies}) == 1
    assert len({reply.json()["images"][0]["id"] for reply in replies}) == 1
    assert worker.generate_calls == before + 2  # one generation per key


def test_a_cancel_sent_to_the_replica_that_does_not_own_the_generation_stops_it(
    pair: Pair,
) -> None:
    worker = pair.worker
    owner, other = pair.replicas
    closed_before, finished_before = worker.closed_early, worker.finished
    worker.steps, worker.step_seconds = 600, 0.05  # 30 s unless canceled
    try:
        reply = httpx.post(
            owner.url + "/api/mv/character_reference_jobs",
            json={"character_description": "a slow snail", "num_images": 1},
        )
        assert reply.status_code == 202, reply.text
        generation_id = reply.json()["generation_id"]
        status_url = f"{other.url}/api/mv/character_reference_jobs/{generation_id}"
        wait_until(lambda: (httpx.get(status_url).json().get("progress") or {}).get("step", 0) > 0)

        canceled = httpx.delete(status_url)
        assert canceled.status_code == 202, canceled.text  # asked of the owner; not done yet
        assert canceled.json()["status"] == "running"
        wait_until(lambda: httpx.get(status_url).json()["status"] == "canceled", timeout=10)
        wait_until(lambda: worker.closed_early == closed_before + 1, timeout=10)
        assert worker.finished == finished_before  # the worker stopped: it never finished
        owner_view = httpx.get(f"{owner.url}/api/mv/character_reference_jobs/{generation_id}")
        assert owner_view.json()["status"] == "canceled"
        assert not pair.tier.keys(f"generations/cancel/{generation_id}")  # the marker was consumed
    finally:
        worker.steps, worker.step_seconds = 4, 0.02


def test_images_uploaded_on_both_replicas_are_listed_by_either(pair: Pair) -> None:
    first, second = pair.replicas
    before = {
        item["id"]
        for item in httpx.get(first.url + "/api/mv/character_references?limit=100").json()["items"]
    }
    calls = [
        (lambda replica=replica, index=index: httpx.post(
            replica.url + "/api/mv/upload_character_reference",
            files={"file": (f"{index}.png", _png(900 + index), "image/png")},
        ))
        for index, replica in enumerate([first, second] * 4)
    ]  # fmt: skip
    replies = _all_at_once(calls)
    assert [reply.status_code for reply in replies] == [201] * 8
    uploaded = {reply.json()["id"] for reply in replies}
    for replica in (first, second):
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = httpx.get(replica.url + "/api/mv/character_references", params=params).json()
            seen.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert set(seen) == uploaded | before
    # A cursor handed out by one replica works on the other.
    page = httpx.get(first.url + "/api/mv/character_references", params={"limit": 2}).json()
    rest = httpx.get(
        second.url + "/api/mv/character_references",
        params={"limit": 100, "cursor": page["next_cursor"]},
    ).json()
    assert [item["id"] for item in page["items"]] + [item["id"] for item in rest["items"]] == seen


def test_the_replica_that_does_not_run_a_generation_streams_its_events(pair: Pair) -> None:
    worker = pair.worker
    owner, other = pair.replicas
    worker.steps, worker.step_seconds = 30, 0.1  # 3 s: progress is saved every second
    try:
        reply = httpx.post(
            owner.url + "/api/mv/character_reference_jobs",
            json={"character_description": "a slow snail", "num_images": 1},
        )
        assert reply.status_code == 202, reply.text
        events_url = other.url + reply.json()["events_url"]
        received = []
        with httpx.stream("GET", events_url, timeout=30) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    received.append(line.removeprefix("event: "))
        assert received[-1] == "succeeded", received
        assert "progress" in received, received  # read from the shared record
    finally:
        worker.steps, worker.step_seconds = 4, 0.02


def test_a_delete_on_one_replica_is_seen_by_the_other_within_its_window(pair: Pair) -> None:
    deleter, other = pair.replicas
    uploaded = httpx.post(
        deleter.url + "/api/mv/upload_character_reference",
        files={"file": ("gone.png", _png(4242), "image/png")},
    )
    assert uploaded.status_code == 201
    image_id = uploaded.json()["id"]
    reads = [
        f"/api/mv/get_character_reference/{image_id}",
        f"/api/mv/character_references/{image_id}/metadata",
        f"/api/mv/character_references/{image_id}/thumbnail/256",
    ]
    # The other replica serves it first, and so holds its own copies (in S3 mode).
    assert [httpx.get(other.url + path).status_code for path in reads] == [200, 200, 200]

    assert httpx.delete(deleter.url + f"/api/mv/character_references/{image_id}").status_code == 204
    # DELETE_POLL_SECONDS is 1 (the default); the README promises about a second.
    wait_until(
        lambda: [httpx.get(other.url + path).status_code for path in reads] == [404] * 3,
        timeout=5,
    )
    assert [httpx.get(deleter.url + path).status_code for path in reads] == [404] * 3
    assert pair.tier.keys(f"character_references/{image_id}") == []

"""A replica killed in the middle of a burst loses nothing it acknowledged.

Two API processes share one storage tier (a bucket on moto's or ministack's server, each
replica with its own local tier; or one OUTPUT_DIR). A burst goes through both: attaches to one
job, job-directory persists (worker processes, two per machine) and async generations (on a
paced fake worker tier over HTTP). In the middle, one replica gets SIGKILL; it is started
again, as a supervisor would. A client retries on the survivor what got no reply (attaches
are idempotent). Afterwards every accepted generation is final, the job's manifest lists
exactly what was acknowledged, every object is whole, and nothing is left half-written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    start_replica,
    stop_replica,
    wait_healthy,
)
from services.storage import is_temp_file

IMAGES = 24
GENERATIONS = 8
PERSISTS = 4
FILES_PER_PERSIST = 5
FINAL = {"succeeded", "failed", "canceled"}


@dataclass
class Burst:
    """What the client sent and what it was told."""

    attached: dict[str, int] = field(default_factory=dict)  # image id -> final status
    cut_off_attaches: int = 0  # sent to the killed replica, no reply: sent again elsewhere
    generations: dict[str, str] = field(default_factory=dict)  # acknowledged id -> replica
    cut_off_generations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(params=["s3", "s3-ministack", "local"])
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedTier]:
    """One bucket (moto, ministack) or one OUTPUT_DIR for both replicas."""
    with pytest.MonkeyPatch.context() as environment:
        for name, value in OFFLINE_AWS.items():  # for this test's own S3 client
            environment.setenv(name, value)
        yield open_shared_tier(request, request.param, tmp_path)


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (index % 256, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _persist(job_id: str, directory: Path, settings: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.job_assets", "persist", job_id, str(directory)],
        cwd=BACKEND_DIR,
        env=process_environment(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_replica_killed_mid_burst_loses_nothing_it_acknowledged(
    tier: SharedTier, tmp_path: Path
) -> None:
    worker = PacedWorker()
    # A generation takes 2 s: the doomed replica cannot finish those it accepted before the
    # kill, which comes once it has accepted two and answered three attaches.
    worker.steps, worker.step_seconds = 20, 0.1
    with contextlib.ExitStack() as stack:
        worker_url = stack.enter_context(serve(worker.app()))
        common = {
            "IMAGE_GENERATOR": "worker",
            "WORKER_URL": worker_url,
            "WORKER_TOKEN": TOKEN,
            "LOG_LEVEL": "WARNING",
        }
        settings = {
            name: {**common, **tier.for_machine(tmp_path / name)}
            for name in ("replica-a", "replica-b")
        }
        replicas = [start_replica(name, settings[name], tmp_path) for name in settings]
        stack.callback(lambda: [stop_replica(replica) for replica in replicas])
        for replica in replicas:
            wait_healthy(replica)
        _run(tier, replicas, settings, tmp_path)


def _run(
    tier: SharedTier,
    replicas: list[Replica],
    settings: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    doomed, survivor = replicas
    job_id = f"crash-{uuid.uuid4().hex[:8]}"
    assert httpx.post(survivor.url + "/api/mv/jobs", json={"job_id": job_id}).status_code == 201
    images = []
    for index in range(IMAGES):
        reply = httpx.post(
            replicas[index % 2].url + "/api/mv/upload_character_reference",
            files={"file": (f"{index}.png", _png(index), "image/png")},
        )
        assert reply.status_code == 201, reply.text
        images.append(reply.json()["id"])
    files: dict[str, bytes] = {}
    directories = []
    for persist in range(PERSISTS):
        directory = tmp_path / f"job-dir-{persist}"
        for shot in range(FILES_PER_PERSIST):
            relative = f"renders/p{persist}/shot{shot}.bin"
            files[relative] = os.urandom(40_000)
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(files[relative])
        directories.append(directory)

    burst = Burst()
    doomed_answered = threading.Semaphore(0)
    doomed_accepted = threading.Semaphore(0)

    def attach(index: int, image_id: str) -> None:
        targets = [replicas[index % 2], survivor]
        for target in targets:
            try:
                reply = httpx.post(
                    f"{target.url}/api/mv/jobs/{job_id}/character_references",
                    json={"image_ids": [image_id]},
                    timeout=60,
                )
            except httpx.TransportError:  # no reply: the replica died under it
                with burst.lock:
                    burst.cut_off_attaches += 1
                continue
            if target is doomed:
                doomed_answered.release()
            with burst.lock:
                burst.attached[image_id] = reply.status_code
            return

    def generate(index: int) -> None:
        target = replicas[index % 2]
        try:
            reply = httpx.post(
                target.url + "/api/mv/character_reference_jobs",
                json={"character_description": f"a dancer, take {index}", "num_images": 1},
                timeout=60,
            )
        except httpx.TransportError:
            with burst.lock:
                burst.cut_off_generations += 1
            return
        assert reply.status_code == 202, reply.text
        if target is doomed:
            doomed_accepted.release()
        with burst.lock:
            burst.generations[reply.json()["generation_id"]] = target.name

    persists = [
        _persist(job_id, directory, settings[replicas[number % 2].name])
        for number, directory in enumerate(directories)
    ]
    with concurrent.futures.ThreadPoolExecutor(IMAGES + GENERATIONS) as pool:
        futures = [pool.submit(generate, index) for index in range(GENERATIONS)]
        futures += [pool.submit(attach, index, image_id) for index, image_id in enumerate(images)]
        # In the middle: the doomed replica has answered some attaches, not all, and has
        # generations queued and running.
        for answered in [doomed_accepted] * 2 + [doomed_answered] * 3:
            assert answered.acquire(timeout=60)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        for future in futures:
            future.result()
    # What it had accepted and not finished, as the shared tier says now that it is dead.
    unfinished_at_kill = _unfinished(survivor, burst, doomed.name)
    assert unfinished_at_kill, "the kill came after every generation of the doomed replica"

    restarted = start_replica(doomed.name, settings[doomed.name], tmp_path)
    replicas[0] = restarted  # stopped by the test's cleanup
    wait_healthy(restarted)
    for process in persists:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()

    # Every accepted generation ends: those the killed replica ran are failed on its start-up.
    def final(generation_id: str) -> str | None:
        reply = httpx.get(f"{survivor.url}/api/mv/character_reference_jobs/{generation_id}")
        status = reply.json()["status"]
        return status if status in FINAL else None

    wait_until(lambda: all(final(gid) for gid in burst.generations), timeout=60)
    for generation_id in burst.generations:
        record = httpx.get(f"{restarted.url}/api/mv/character_reference_jobs/{generation_id}")
        status = record.json()["status"]
        if generation_id in unfinished_at_kill:
            assert status == "failed", record.text
            assert record.json()["error"]["error"] == "Interrupted"
        else:
            assert status == "succeeded", record.text
    # Its start-up went through all it had left (a record is saved before its marker goes),
    # those it accepted with no reply getting through included: nothing is left unfinished.
    wait_until(lambda: not tier.keys(f"generations/active/{doomed.name}/"), timeout=30)
    for key in tier.keys("generations/"):
        if key.endswith(".json") and "/index/" not in key and "/active/" not in key:
            assert json.loads(tier.read(key))["status"] in FINAL, key

    # Every attach was acknowledged in the end; the manifest lists exactly those and the files.
    assert burst.attached == dict.fromkeys(images, 200)
    manifest = json.loads(tier.read(f"jobs/{job_id}/manifest.json"))
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    expected = {f"character_reference/{image_id}.png" for image_id in images} | set(files)
    assert set(listed) == expected
    for relative, data in files.items():
        assert listed[relative] == hashlib.sha256(data).hexdigest()
    # Every object is whole: the job's match the manifest, and nothing else is under the job.
    stored = set(tier.keys(f"jobs/{job_id}/"))
    assert stored == {f"jobs/{job_id}/{path}" for path in listed} | {f"jobs/{job_id}/manifest.json"}
    for path, sha256 in listed.items():
        assert hashlib.sha256(tier.read(f"jobs/{job_id}/{path}")).hexdigest() == sha256
    for key in tier.keys("character_references/"):
        if key.endswith(".json") and "/" not in key.removeprefix("character_references/"):
            record = json.loads(tier.read(key))
            image = tier.read(key.removesuffix(".json") + ".png")
            assert hashlib.sha256(image).hexdigest() == record["sha256"], key
            Image.open(io.BytesIO(image)).verify()
    # No temp file outlives the restart (the killed writer's are removed at start-up).
    for root in _local_tiers(tier, settings):
        wait_until(lambda root=root: not _temp_files(root), timeout=30)


def _unfinished(survivor: Replica, burst: Burst, name: str) -> set[str]:
    """The acknowledged generations of replica `name` that have not finished yet."""
    with burst.lock:
        ids = [gid for gid, replica in burst.generations.items() if replica == name]
    unfinished = set()
    for generation_id in ids:
        reply = httpx.get(f"{survivor.url}/api/mv/character_reference_jobs/{generation_id}")
        if reply.json()["status"] not in FINAL:
            unfinished.add(generation_id)
    return unfinished


def _local_tiers(tier: SharedTier, settings: dict[str, dict[str, str]]) -> list[Path]:
    return sorted({Path(machine["OUTPUT_DIR"]) for machine in settings.values()})


def _temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and is_temp_file(path)]

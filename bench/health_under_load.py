"""Event-loop benchmark: /health latency idle and while four generations run, in one run.

Run with `make bench` (or, from backend/, `python ../bench/health_under_load.py`). A real
server (`uvicorn main:app`, one process) runs the tiny FLUX-family model on the CPU. A client
sends /health requests one after another over one keep-alive connection, first with the
server idle, then while four asynchronous generations (4 images each at 1024x1024) are queued
and running. If anything blocked the event loop (GPU/CPU work, file or S3 I/O on the loop),
/health would wait for it and the p99 under load would jump to the length of that work.

Both phases are measured in the same run; the ratio is under-load / idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Row, print_table  # noqa: E402
from servers import free_port  # noqa: E402

from tools.make_tiny_model import build  # noqa: E402

BODY = {"character_description": "a silver metallic humanoid robot", "num_images": 4, "seed": 1}


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def health_latencies(client: httpx.Client, count: int | None, until=None) -> list[float]:
    """Milliseconds of sequential /health requests: `count` of them, or until `until()`."""
    latencies: list[float] = []
    while (count is not None and len(latencies) < count) or (until is not None and not until()):
        started = time.perf_counter()
        reply = client.get("/health")
        latencies.append((time.perf_counter() - started) * 1000)
        assert reply.status_code == 200
    return latencies


def health_while_generating(
    client: httpx.Client, body: dict, generations: int
) -> tuple[list[float], float]:
    """/health latencies while `generations` asynchronous generations of `body` run, and for
    how many seconds they ran; raises unless they all succeeded."""
    with httpx.Client(base_url=client.base_url, timeout=300) as submitter:
        status_urls = [
            submitter.post("/api/mv/character_reference_jobs", json=body).json()["status_url"]
            for _ in range(generations)
        ]

        def all_finished() -> bool:
            statuses = [submitter.get(url).json()["status"] for url in status_urls]
            return all(status in ("succeeded", "failed", "canceled") for status in statuses)

        started = time.perf_counter()
        loaded: list[float] = []
        while not all_finished():
            loaded += health_latencies(client, 50)
        busy_seconds = time.perf_counter() - started
        outcomes = [submitter.get(url).json()["status"] for url in status_urls]
    if any(outcome != "succeeded" for outcome in outcomes):
        raise RuntimeError(f"the load generations did not all succeed: {outcomes}")
    return loaded, busy_seconds


def measure(idle_requests: int = 500, generations: int = 4) -> list[Row]:
    """Start the server, measure both phases; /health p50 and p99 under load against idle."""

    work = Path(tempfile.mkdtemp(prefix="bench-health-"))
    model = build(work / "tiny-flux", "flux")
    port = free_port()
    env = {
        **os.environ,
        "LOCAL_MODEL_ID": str(model),
        "LOCAL_DEVICE": "cpu",
        "IMAGE_GENERATOR": "local",
        "OUTPUT_DIR": str(work / "outputs"),
        "STORAGE_BACKEND": "local",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=BACKEND_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready")
                time.sleep(0.2)
            client.post("/api/mv/generate_character_reference", json=BODY)  # warm-up
            idle = health_latencies(client, idle_requests)
            loaded, busy_seconds = health_while_generating(client, BODY, generations)
    finally:
        server.terminate()
        server.wait(30)

    note = f"{len(loaded)} requests over {busy_seconds:.0f} s of {generations} generations"
    return [
        Row(
            "/health p50 under generation load vs idle",
            statistics.median(loaded),
            statistics.median(idle),
            "ms",
            False,
            note,
        ),
        Row(
            "/health p99 under generation load vs idle",
            percentile(loaded, 0.99),
            percentile(idle, 0.99),
            "ms",
            False,
            note,
        ),
        Row(
            "/health max under generation load vs idle",
            max(loaded),
            max(idle),
            "ms",
            False,
            "a blocked event loop would show here as seconds",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-requests", type=int, default=500)
    parser.add_argument("--generations", type=int, default=4)
    options = parser.parse_args()
    print_table(measure(options.idle_requests, options.generations))

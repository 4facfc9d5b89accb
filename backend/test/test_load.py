"""Load runs with locust against a live server on 127.0.0.1, each bounded in time.

1. Generation at twice the server's capacity: capacity is GENERATION_WORKERS running plus
   MAX_QUEUED_GENERATIONS waiting; twice that many clients each ask again as soon as they are
   answered. Every accepted request must finish with its image, the rest must get fast 429s,
   and nothing may be a 5xx.
2. Image GETs at a steady rate in local mode (bytes) and in redirect mode (307 to S3): no
   errors at all.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import REPO_ROOT, load_settings
from conftest import image_bytes, new_bucket_name, wait_until
from live_server import serve
from main import create_app
from services.storage.s3 import make_s3_client

LOCUSTFILE = Path(__file__).with_name("load") / "locustfile.py"
WORKERS = 1
QUEUE = 2
CAPACITY = WORKERS + QUEUE


def run_locust(
    base_url: str, scenario: str, users: int, seconds: int, tmp_path: Path, **env: str
) -> dict[str, dict[str, list[float]]]:
    """Run one headless locust scenario; return {name: {status: [ms, ...]}}."""
    summary = tmp_path / f"{scenario}.json"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{seconds}s",
        "--host",
        base_url,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "30",
    ]
    environment = {**os.environ, "LOAD_SCENARIO": scenario, "LOAD_SUMMARY": str(summary), **env}
    subprocess.run(
        command,
        env=environment,
        cwd=tmp_path,
        check=True,
        timeout=seconds + 90,
        capture_output=True,
    )
    return json.loads(summary.read_text())


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def live_settings(tmp_path: Path, model: Path, **overrides: Any):
    """Settings for a live server on the tiny model."""
    return load_settings(
        _env_file=REPO_ROOT / ".env.test",
        output_dir=tmp_path / "outputs",
        local_model_id=str(model),
        local_device="cpu",
        image_generator="local",
        generation_workers=WORKERS,
        max_queued_generations=QUEUE,
        log_level="WARNING",
        **overrides,
    )


def metric(text: str, name: str) -> float:
    """One sample's value from a Prometheus text page."""
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def test_generation_at_twice_capacity_finishes_what_it_accepts_and_refuses_fast(
    tmp_path: Path, tiny_sdxl_turbo: Path
) -> None:
    app = create_app(live_settings(tmp_path, tiny_sdxl_turbo))
    with serve(app) as base_url, httpx.Client(base_url=base_url) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, timeout=60)
        timings = run_locust(base_url, "generate", 2 * CAPACITY, 15, tmp_path)["generate"]
        metrics = client.get("/metrics").text

    accepted, refused = timings.get("200", []), timings.get("429", [])
    summary = {status: len(times) for status, times in timings.items()}
    print(f"\ngeneration load at 2x capacity: {summary}")
    assert set(timings) <= {"200", "429"}, summary  # no 5xx, no failed reply, no lost socket
    assert len(accepted) >= 5 and len(refused) >= 5, summary
    # Every accepted request finished: the server counted exactly that many successes.
    assert metric(metrics, 'mv_generations_total{status="succeeded"}') == len(accepted)
    assert metric(metrics, "mv_generations_rejected_total") == len(refused)
    assert metric(metrics, "mv_generation_queue_depth") == 0
    # Refusals are fast: the slowest 429 took a fraction of a typical accepted request.
    median_accepted = statistics.median(accepted)
    p99_refused = percentile(refused, 0.99)
    print(f"accepted median {median_accepted:.0f} ms; refused p99 {p99_refused:.1f} ms")
    assert p99_refused < median_accepted / 4


def _image_load(base_url: str, paths: list[str], status: str, tmp_path: Path) -> dict:
    timings = run_locust(
        base_url,
        "images",
        4,
        8,
        tmp_path,
        LOAD_IMAGE_PATHS=",".join(paths),
        LOAD_RATE_PER_USER="25",
    )["image"]
    summary = {code: len(times) for code, times in timings.items()}
    p99 = percentile(timings[status], 0.99)
    print(f"\nimage GETs expecting {status}: {summary}, p99 {p99:.1f} ms")
    assert set(timings) == {status}, summary  # 0 errors
    assert len(timings[status]) >= 400  # about 100 requests a second for 8 s
    return summary


def test_image_gets_at_a_steady_rate_in_local_mode(tmp_path: Path, tiny_sdxl_turbo: Path) -> None:
    app = create_app(live_settings(tmp_path, tiny_sdxl_turbo))
    with serve(app) as base_url, httpx.Client(base_url=base_url) as client:
        paths = [
            client.post(
                "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes())}
            ).json()["url"]
            for _ in range(5)
        ]
        _image_load(base_url, paths, "200", tmp_path)


def test_image_gets_at_a_steady_rate_in_redirect_mode(
    tmp_path: Path, tiny_sdxl_turbo: Path, request: pytest.FixtureRequest
) -> None:
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = new_bucket_name()
    make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    settings = live_settings(
        tmp_path,
        tiny_sdxl_turbo,
        storage_backend="s3",
        storage_bucket=bucket,
        aws_endpoint_url=endpoint,
        serve_from_cloud=True,
    )
    with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url) as client:
        ids = [
            client.post(
                "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes())}
            ).json()["id"]
            for _ in range(5)
        ]
        paths = [f"/api/mv/get_character_reference/{image_id}?redirect=true" for image_id in ids]
        _image_load(base_url, paths, "307", tmp_path)

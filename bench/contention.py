"""Contention benchmark: attaches to one job from 8 writers on two API replicas vs one writer.

Run with `make bench` (or, from backend/, `python ../bench/contention.py`). Two API processes
(uvicorn) share one storage tier: one S3 bucket (moto's server, in its own process; each
replica has its own local tier), then one OUTPUT_DIR. Every attach merges an image into the
job's manifest with a compare-and-swap; a writer that loses the race reads again and retries.

- baseline: one writer attaching images to a job one after another, on one replica;
- measured: 8 writers at once, spread over both replicas, attaching distinct images to one job.
The note gives the retries per attach (from both replicas' /metrics) and checks that the
manifest lists every image: no lost update is the bar, the figure shows its price.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(BACKEND_DIR / "test"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Row, print_table  # noqa: E402
from run import start_moto_server  # noqa: E402

from replicas import OFFLINE_AWS, run_replicas  # noqa: E402
from services.storage import make_s3_client  # noqa: E402

WRITERS = 8
CONFLICTS_METRIC = "mv_job_manifest_conflicts_total"


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (index % 256, index // 256 % 256, 99)).save(buffer, format="PNG")
    return buffer.getvalue()


def _conflicts(urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith(CONFLICTS_METRIC + " "):
                total += float(line.split()[1])
    return total


def _attach(url: str, job_id: str, image_id: str, client: httpx.Client) -> None:
    reply = client.post(f"{url}/api/mv/jobs/{job_id}/character_references",
                        json={"image_ids": [image_id]})  # fmt: skip
    reply.raise_for_status()


def _measure_mode(mode: str, urls: list[str], attaches: int) -> Row:
    with httpx.Client(timeout=60) as client:
        ids = []
        for index in range(2 * attaches):
            reply = client.post(
                urls[index % 2] + "/api/mv/upload_character_reference",
                files={"file": (f"{index}.png", _png(index), "image/png")},
            )
            reply.raise_for_status()
            ids.append(reply.json()["id"])
        solo, crowded = ids[:attaches], ids[attaches:]
        for job_id in ("solo", "crowded"):
            client.post(urls[0] + "/api/mv/jobs", json={"job_id": job_id}).raise_for_status()

        started = time.perf_counter()
        for image_id in solo:
            _attach(urls[0], "solo", image_id, client)
        one_writer = attaches / (time.perf_counter() - started)

        before = _conflicts(urls)
        started = time.perf_counter()
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(lambda i: _attach(urls[i % 2], "crowded", crowded[i], client),
                          range(attaches)))  # fmt: skip
        eight_writers = attaches / (time.perf_counter() - started)
        retries = (_conflicts(urls) - before) / attaches

        listed = {
            ref["image_id"]
            for ref in client.get(urls[1] + "/api/mv/jobs/crowded").json()["character_references"]
        }
    lost = len(set(crowded) - listed)
    return Row(
        f"attach to one job, {WRITERS} writers on 2 replicas ({mode})",
        eight_writers,
        one_writer,
        "/s",
        True,
        f"vs 1 writer; {retries:.2f} retries per attach; {lost} of {attaches} lost",
    )


def measure(attaches: int = 64) -> list[Row]:
    """Both storage modes; one row each."""
    rows = []
    for name, value in OFFLINE_AWS.items():  # moto accepts any credentials
        os.environ.setdefault(name, value)
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as temp:
        base = Path(temp)
        common = {"IMAGE_GENERATOR": "replicate", "REPLICATE_API_TOKEN": "r8_bench-token",
                  "LOG_LEVEL": "WARNING"}  # fmt: skip
        moto, endpoint = start_moto_server()
        try:
            make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(
                Bucket="bench-contention"
            )
            s3 = {"STORAGE_BACKEND": "s3", "STORAGE_BUCKET": "bench-contention",
                  "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
            settings = {
                name: {**common, **s3, "OUTPUT_DIR": str(base / name)}
                for name in ("bench-a", "bench-b")
            }
            with run_replicas(settings, base) as replicas:
                rows.append(_measure_mode("S3", [r.url for r in replicas], attaches))
        finally:
            moto.kill()
            moto.wait()
        local = {"STORAGE_BACKEND": "local", "OUTPUT_DIR": str(base / "shared")}
        settings = {name: {**common, **local} for name in ("bench-c", "bench-d")}
        with run_replicas(settings, base) as replicas:
            rows.append(_measure_mode("one OUTPUT_DIR", [r.url for r in replicas], attaches))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attaches", type=int, default=64)
    options = parser.parse_args()
    print_table(measure(options.attaches), title="Attach contention")

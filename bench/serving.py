"""Serving benchmark: image GETs through the API against bare Starlette apps, in one run.

Run with `make bench` (or, from backend/, `python ../bench/serving.py`). Every server is a real
`uvicorn` process on 127.0.0.1 (one worker); the client sends sequential GETs over one
keep-alive connection, alternating between the API and its baseline in short rounds:

1. local mode: GET /api/mv/get_character_reference/{id} (id check, lookup, ETag, the file)
   against a bare Starlette app whose only route returns a FileResponse of the same file;
2. S3 mode serving the local tier's copy (S3 on a moto server, SERVE_FROM_CLOUD=false): the same
   GET, with the replica reading the other replicas' deletes every second meanwhile, against the
   same bare app;
3. redirect mode (S3 on a moto server, SERVE_FROM_CLOUD=true): GET ...?redirect=true (id check,
   lookup, presigning, 307) against a bare app whose only route returns a 307 to the same URL.
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

BENCH_DIR = Path(__file__).resolve().parent
BACKEND_DIR = BENCH_DIR.parent / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(BENCH_DIR))

from report import Row, print_table  # noqa: E402
from run import start_moto_server  # noqa: E402
from servers import start_listening  # noqa: E402

from services.storage import make_s3_client  # noqa: E402


def start_server(app: str, app_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`uvicorn app` on a free loopback port; returns the process and its base URL."""
    return start_listening(
        lambda port: [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, **env},
    )


def upload(api_url: str, image: Path) -> dict:
    """Upload `image` through the API; its reply (id, path, url...)."""
    with httpx.Client(base_url=api_url) as client:
        reply = client.post(
            "/api/mv/upload_character_reference", files={"file": ("a.png", image.read_bytes())}
        )
        return reply.json()


def requests_per_second(url: str, count: int, status: int) -> float:
    """Sequential GETs of `url` over one connection; requests per second."""
    with httpx.Client(follow_redirects=False) as client:
        client.get(url)  # connect
        started = time.perf_counter()
        for _ in range(count):
            reply = client.get(url)
            assert reply.status_code == status, reply.status_code
        return count / (time.perf_counter() - started)


def compare(
    api_url: str, bare_url: str, status: int, count: int, rounds: int
) -> tuple[float, float]:
    """Median requests/s of the API and of the bare app over `rounds` short rounds each.

    The two take turns, and turn about which goes first, so a slow spell of the machine (they
    come and go over seconds on a shared host) falls on both alike.
    """
    api, bare = [], []
    for round_number in range(rounds):
        pair = [(api, api_url), (bare, bare_url)]
        for results, url in pair if round_number % 2 else reversed(pair):
            results.append(requests_per_second(url, count, status))
    return statistics.median(api), statistics.median(bare)


def measure(count: int = 250, rounds: int = 20) -> list[Row]:
    """Both comparisons, as report rows."""
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    image = work / "image.png"
    from PIL import Image

    Image.effect_noise((512, 512), 60).convert("RGB").save(image)  # about 650 KB
    processes: list[subprocess.Popen] = []
    base = {"IMAGE_GENERATOR": "replicate", "LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    try:
        api, api_url = start_server(
            "main:app", BACKEND_DIR, {**base, "OUTPUT_DIR": str(work / "local")}
        )
        processes.append(api)
        stored = upload(api_url, image)
        stored_file = work / "local" / stored["path"]
        bare, bare_url = start_server(
            "bare_apps:file_app", BENCH_DIR, {"BARE_FILE": str(stored_file)}
        )
        processes.append(bare)
        local = compare(f"{api_url}{stored['url']}", f"{bare_url}/image", 200, count, rounds)

        moto, endpoint = start_moto_server()
        processes.append(moto)
        credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
        os.environ.update(credentials)
        make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket="bench")
        cloud_env = {
            **base,
            **credentials,
            "OUTPUT_DIR": str(work / "s3"),
            "STORAGE_BACKEND": "s3",
            "STORAGE_BUCKET": "bench",
            "AWS_ENDPOINT_URL": endpoint,
            "SERVE_FROM_CLOUD": "true",
        }
        cached, cached_url = start_server(
            "main:app",
            BACKEND_DIR,
            {**cloud_env, "OUTPUT_DIR": str(work / "s3-cache"), "SERVE_FROM_CLOUD": "false"},
        )
        processes.append(cached)
        cached_path = f"/api/mv/get_character_reference/{upload(cached_url, image)['id']}"
        cached_local = compare(
            f"{cached_url}{cached_path}", f"{bare_url}/image", 200, count, rounds
        )
        cached.terminate()  # one API at a time, as in the other rows
        cached.wait(30)
        cloud, cloud_url = start_server("main:app", BACKEND_DIR, cloud_env)
        processes.append(cloud)
        image_id = upload(cloud_url, image)["id"]
        redirect_path = f"/api/mv/get_character_reference/{image_id}?redirect=true"
        location = httpx.get(cloud_url + redirect_path).headers["location"]
        bare_redirect, bare_redirect_url = start_server(
            "bare_apps:redirect_app", BENCH_DIR, {"BARE_REDIRECT_URL": location}
        )
        processes.append(bare_redirect)
        redirect = compare(
            f"{cloud_url}{redirect_path}", f"{bare_redirect_url}/image", 307, count, rounds
        )
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
    return [
        Row(
            "local image GET vs bare FileResponse app",
            *local,
            "req/s",
            True,
            f"{image.stat().st_size // 1000} KB PNG, sequential, keep-alive",
        ),
        Row(
            "S3 mode, local tier's copy vs bare FileResponse app",
            *cached_local,
            "req/s",
            True,
            "deletes read every 1 s meanwhile",
        ),
        Row(
            "redirect (307 to S3) vs bare redirect app",
            *redirect,
            "req/s",
            True,
            "URL reused while 90 % valid",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=250, help="per round and server")
    parser.add_argument("--rounds", type=int, default=20)
    arguments = parser.parse_args()
    print_table(measure(arguments.requests, arguments.rounds))

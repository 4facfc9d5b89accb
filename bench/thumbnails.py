"""Thumbnail benchmark: what a client downloads to show 4 candidates, and how fast thumbnails
are served, against the originals, in one run.

Run with `make bench` (or, from backend/, `python ../bench/thumbnails.py`). One API server
(`uvicorn`, local storage) holds four 1024x1024 PNG candidates:
1. bytes: the four 256 px WebP thumbnails (`thumbnail_url`) against the four originals
   (`url`), for picture-like images and for pure noise (the worst case for compression);
2. req/s: sequential GETs of a thumbnail (after the first, which renders it) against GETs of
   its original, over one keep-alive connection, alternating round by round.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import Row, print_table  # noqa: E402
from serving import BACKEND_DIR, compare, start_server  # noqa: E402

SIDE = 1024
CANDIDATES = 4


def picture_like(seed: int) -> bytes:
    """A 1024x1024 PNG with gradients, shapes and grain, like a generated character image."""
    gradient = Image.linear_gradient("L").resize((SIDE, SIDE))
    grain = Image.effect_noise((SIDE, SIDE), 18 + seed)
    image = Image.merge("RGB", (gradient, grain, gradient.rotate(90 * (seed + 1))))
    draw = ImageDraw.Draw(image)
    for index in range(6):
        box = (100 + 60 * index + seed * 10, 150 + 40 * index, 600 + 50 * index, 700 + 30 * index)
        draw.ellipse(box, fill=(40 * index, 200 - 20 * index, 90 + seed * 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(seed: int) -> bytes:
    """A 1024x1024 PNG of colour noise."""
    channels = [Image.effect_noise((SIDE, SIDE), 80 + seed + band) for band in range(3)]
    buffer = io.BytesIO()
    Image.merge("RGB", channels).save(buffer, format="PNG")
    return buffer.getvalue()


def grid_kilobytes(client: httpx.Client, images: list[bytes]) -> tuple[float, float]:
    """KB downloaded to show `images` as thumbnails, and as originals."""
    thumbnails = originals = 0
    for data in images:
        stored = client.post(
            "/api/mv/upload_character_reference", files={"file": ("c.png", data)}
        ).json()
        thumbnails += len(client.get(stored["thumbnail_url"]).content)
        originals += len(client.get(stored["url"]).content)
    return thumbnails / 1024, originals / 1024


def measure(count: int = 250, rounds: int = 20) -> list[Row]:
    """Both comparisons, as report rows."""
    work = Path(tempfile.mkdtemp(prefix="bench-thumbnails-"))
    env = {
        "IMAGE_GENERATOR": "replicate",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "OUTPUT_DIR": str(work / "outputs"),
    }
    processes: list[subprocess.Popen] = []
    try:
        api, api_url = start_server("main:app", BACKEND_DIR, env)
        processes.append(api)
        with httpx.Client(base_url=api_url, timeout=60) as client:
            pictures = grid_kilobytes(client, [picture_like(seed) for seed in range(CANDIDATES)])
            noisy = grid_kilobytes(client, [noise(seed) for seed in range(CANDIDATES)])
            stored = client.post(
                "/api/mv/upload_character_reference", files={"file": ("c.png", picture_like(9))}
            ).json()
            client.get(stored["thumbnail_url"])  # the first request renders it
        served = compare(
            f"{api_url}{stored['thumbnail_url']}", f"{api_url}{stored['url']}", 200, count, rounds
        )
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return [
        Row(
            "4 candidates as thumbnails vs originals",
            *pictures,
            "KB",
            False,
            "1024x1024 picture-like PNGs, 256 px WebP; goal <= 0.05",
        ),
        Row(
            "4 noise candidates as thumbnails vs originals",
            *noisy,
            "KB",
            False,
            "worst case: pure colour noise",
        ),
        Row(
            "thumbnail GET vs original GET",
            *served,
            "req/s",
            True,
            "local storage, after the first GET; sequential, keep-alive",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=250, help="per round and route")
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    print_table(measure(options.requests, options.rounds), title="Thumbnails")

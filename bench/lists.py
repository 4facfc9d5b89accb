"""Lists and live progress, each against its baseline measured in the same run.

Run with `make bench` (or, from backend/, `python ../bench/lists.py`).
1. A page of `GET /character_references` (50 items, through AssetPersistenceService on S3:
   moto's server in its own process) for an owner with 10,000 stored images against one with
   100, in the same bucket: milliseconds per page and storage requests per page. The index
   makes both flat; a scan of the owner's objects would grow a hundredfold.
2. Progress to the client: the time from a generator's progress step to the client knowing
   it, over the event stream against polling the status every second (as the studio did),
   p50 and p99, on one server (uvicorn on loopback) watched by both clients at once.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BACKEND_DIR = BENCH_DIR.parent / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(BACKEND_DIR / "test"))
sys.path.insert(0, str(BENCH_DIR))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from report import Row, print_table  # noqa: E402
from run import BUCKET, start_moto_server  # noqa: E402

from config import load_settings  # noqa: E402
from live_server import serve  # noqa: E402
from main import create_app  # noqa: E402
from services.asset_persistence import (  # noqa: E402
    AssetPersistenceService,
    CharacterReferenceRecord,
    ListFilter,
)
from services.asset_persistence.listing import ALL, INDEX_ROOT  # noqa: E402
from services.generation.base import (  # noqa: E402
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
)
from services.generation.policy import GenerationPolicy  # noqa: E402
from services.owner_index import entry_key  # noqa: E402
from services.storage import (  # noqa: E402
    character_reference_key,
    get_storage_backend,
    make_s3_client,
)
from services.storage import character_reference_sidecar_key as sidecar_key  # noqa: E402

SMALL, LARGE, PAGE = 100, 10_000, 50


# ------------------------------------------------------------------ list pages


def _seed_owner(s3: Any, owner: str, count: int, png: bytes) -> None:
    """`count` stored images of `owner` (image, sidecar, list entry), as the service writes
    them, one second apart."""
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def put(number: int) -> None:
        image_id = str(uuid.uuid4())
        record = CharacterReferenceRecord(
            id=image_id,
            width=8,
            height=8,
            content_type="image/png",
            sha256="0" * 64,
            size=len(png),
            description=f"character {number}",
            seed=number,
            owner=owner,
            created_at=start + timedelta(seconds=number),
        )
        s3.put_object(Bucket=BUCKET, Key=character_reference_key(image_id, "png"), Body=png)
        s3.put_object(Bucket=BUCKET, Key=sidecar_key(image_id), Body=record.model_dump_json())
        entry = entry_key(INDEX_ROOT, owner, ALL, record.created_at, image_id)
        s3.put_object(Bucket=BUCKET, Key=entry, Body=b"")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def measure_pages(rounds: int) -> list[Row]:
    """Milliseconds and storage requests per page, 10,000 images against 100."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    moto, endpoint = start_moto_server()
    work = Path(tempfile.mkdtemp(prefix="bench-lists-"))
    try:
        s3 = make_s3_client(region="us-east-1", endpoint_url=endpoint, max_pool_connections=16)
        s3.create_bucket(Bucket=BUCKET)
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        for owner, count in (("small", SMALL), ("large", LARGE)):
            _seed_owner(s3, owner, count, buffer.getvalue())
        settings = load_settings(
            _env_file=None,
            storage_backend="s3",
            storage_bucket=BUCKET,
            aws_endpoint_url=endpoint,
            output_dir=work,
        )
        requests = 0

        def count_request(backend: str, operation: str, seconds: float, ok: bool) -> None:
            nonlocal requests
            requests += 1

        storage = get_storage_backend(settings, observe=count_request)
        service = AssetPersistenceService(storage, settings=settings)

        async def page_ms(owner: str) -> tuple[float, int]:
            """A first page and the page after it, as a client walks: per page."""
            nonlocal requests
            requests = 0
            started = time.perf_counter()
            first = await service.list_character_references(owner, ListFilter(), PAGE)
            second = await service.list_character_references(
                owner, ListFilter(), PAGE, first.next_cursor
            )
            elapsed = time.perf_counter() - started
            assert len(first.items) == len(second.items) == PAGE
            return elapsed * 1000 / 2, requests // 2

        async def run() -> tuple[list[float], list[float], int, int]:
            small, large = [], []
            # Cold: every sidecar read reaches S3 (afterwards the local tier holds them,
            # as on a replica that served the list before).
            _, small_calls = await page_ms("small")
            _, large_calls = await page_ms("large")
            for number in range(rounds * 4):
                order = [("small", small), ("large", large)]
                for owner, results in order if number % 2 else reversed(order):
                    results.append((await page_ms(owner))[0])
            return small, large, small_calls, large_calls

        small, large, small_calls, large_calls = asyncio.run(run())
        service.storage.close()
    finally:
        moto.terminate()
        moto.wait()
    note = f"{PAGE} items a page, sidecars cached locally; both owners in one bucket"
    return [
        Row(
            f"list page: {LARGE:,} vs {SMALL} stored images (S3, moto), time",
            statistics.median(large),
            statistics.median(small),
            "ms",
            False,
            note,
        ),
        Row(
            f"list page: {LARGE:,} vs {SMALL} stored images (S3, moto), storage calls",
            large_calls,
            small_calls,
            "calls",
            False,
            "S3 requests a page, cold: one listing, one sidecar GET per item",
        ),
    ]


# ------------------------------------------------------------------ progress latency


class PacedGenerator:
    """An ImageGenerator (the real interface) that takes a step at random intervals and
    notes when each step was taken."""

    name = "replicate"
    model = "bench/paced"

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stepped_at: dict[int, float] = {}
        self.rng = random.Random(7)

    def start(self) -> None:
        """Nothing to prepare."""

    async def unavailable_reason(self) -> str | None:
        """Always available."""
        return None

    def known_unavailable_reason(self) -> str | None:
        """Always available."""
        return None

    def max_references(self) -> int:
        """Takes no references."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Its model."""
        return {"model": self.model}

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """Step 1..steps, 0.2-0.6 s apart, then one small image per seed."""
        progress = progress or GenerationProgress()
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.rng.uniform(0.2, 0.6))
            self.stepped_at[step] = time.perf_counter()
            progress.advance(step, self.steps)
        images = tuple(GeneratedImage(seed, Image.new("RGB", (8, 8))) for seed in request.seeds)
        return GenerationResult(images, self.model, "replicate")

    async def aclose(self) -> None:
        """Nothing to release."""


def _watch_stream(url: str, seen: dict[int, float]) -> None:
    with httpx.stream("GET", url, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("id: p."):
                seen.setdefault(int(line.removeprefix("id: p.")), time.perf_counter())


def _poll(url: str, seen: dict[int, float], done: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        while not done.is_set():
            status = client.get(url).json()
            now = time.perf_counter()
            reached = (status.get("progress") or {}).get("step", 0)
            for step in range(1, reached + 1):
                seen.setdefault(step, now)
            if status["status"] == "succeeded":
                return
            done.wait(1.0)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure_progress(steps: int) -> list[Row]:
    """Step-to-client latency, event stream against 1 s polling (p50, p99)."""
    work = Path(tempfile.mkdtemp(prefix="bench-events-"))
    settings = load_settings(
        _env_file=None, output_dir=work, image_generator="replicate", log_level="WARNING"
    )
    generator = PacedGenerator(steps)
    policy = GenerationPolicy("replicate", {"replicate": generator}, timeout_seconds=600)
    with serve(create_app(settings, generation_policy=policy)) as base:
        submitted = httpx.post(
            base + "/api/mv/character_reference_jobs",
            json={"character_description": "a bench", "num_images": 1},
        ).json()
        streamed: dict[int, float] = {}
        polled: dict[int, float] = {}
        done = threading.Event()
        watchers = [
            threading.Thread(target=_watch_stream, args=(base + submitted["events_url"], streamed)),
            threading.Thread(target=_poll, args=(base + submitted["status_url"], polled, done)),
        ]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            watcher.join(timeout=steps * 2 + 60)
        done.set()
    stepped = generator.stepped_at
    stream_ms = [(streamed[s] - stepped[s]) * 1000 for s in streamed if s in stepped]
    poll_ms = [(polled[s] - stepped[s]) * 1000 for s in polled if s in stepped]
    note = f"{len(stream_ms)} steps 0.2-0.6 s apart; both clients watch one generation"
    return [
        Row(
            "progress to the client: event stream vs 1 s polling, p50",
            _percentile(stream_ms, 0.5),
            _percentile(poll_ms, 0.5),
            "ms",
            False,
            note,
        ),
        Row(
            "progress to the client: event stream vs 1 s polling, p99",
            _percentile(stream_ms, 0.99),
            _percentile(poll_ms, 0.99),
            "ms",
            False,
            note,
        ),
    ]


def measure(rounds: int = 5, steps: int = 60) -> list[Row]:
    """Every row of this benchmark."""
    return [*measure_pages(rounds), *measure_progress(steps)]


def main() -> int:
    """Run both and print their rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    options = parser.parse_args()
    print_table(measure(options.rounds, options.steps), title="Lists and live progress")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Storage benchmarks: the service against bare boto3, measured in the same run.

Run with `make bench` (or, from backend/, `python ../bench/run.py`). An S3-compatible server
(moto) runs on 127.0.0.1 in its own process, so it does not share a GIL with what is measured.

1. Presigned URLs per second: `AssetPersistenceService.get_character_reference_url` (id check,
   existence check, presign, awaited from the event loop) against a bare boto3
   `generate_presigned_url` loop over the same keys.
2. Persist throughput for 1-2 MB PNGs: `persist_character_reference` (local write-through copy,
   SHA-256 checksums, the image and its metadata sidecar, URL) against bare boto3 `put_object`
   of the same two objects, and against `put_object` of the image alone; 1 and 4 in flight.
Each figure is the median of several alternating rounds; the ratio is service / bare.
`make bench` runs this with every other benchmark and prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image  # noqa: E402
from report import Row, print_table  # noqa: E402
from servers import start_listening  # noqa: E402

from config import load_settings  # noqa: E402
from services.asset_persistence import AssetPersistenceService  # noqa: E402
from services.storage import get_storage_backend, make_s3_client  # noqa: E402

BUCKET = "bench-bucket"


def start_moto_server() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's S3 server (conditional writes decided atomically, as S3 does) in a child
    process on a free loopback port."""
    moto_server = str(BACKEND_DIR / "test" / "atomic_moto.py")
    return start_listening(
        lambda port: [sys.executable, moto_server, "-H", "127.0.0.1", "-p", str(port)],
        timeout=30,
    )


def make_pngs(directory: Path, count: int) -> list[Path]:
    """Random-pixel PNGs of 1-2 MB (random pixels do not compress: the size is what is sent)."""
    paths = []
    for index in range(count):
        side = 600 + (index % 5) * 50  # 600..800 px square: 1.1-1.9 MB
        path = directory / f"bench-{index}.png"
        pixels = os.urandom(side * side * 3)
        Image.frombytes("RGB", (side, side), pixels).save(path, compress_level=1)
        paths.append(path)
    return paths


def median_rate(rounds: list[float]) -> float:
    """Median of per-round rates."""
    return statistics.median(rounds)


async def timed(count: int, run: Callable[[], Awaitable[None]]) -> float:
    """Operations per second of one awaited round of `count` operations."""
    start = time.perf_counter()
    await run()
    return count / (time.perf_counter() - start)


async def bench_presign(
    service: AssetPersistenceService, client, ids: list[str], calls: int, rounds: int
) -> tuple[float, float]:
    """(service rate, bare rate) for presigned URLs."""
    keys = [f"character_references/{image_id}.png" for image_id in ids]
    expiry = service.settings.presigned_url_expiry

    async def through_service() -> None:
        for index in range(calls):
            url = await service.get_character_reference_url(ids[index % len(ids)])
            assert url is not None

    async def bare() -> None:
        for index in range(calls):
            client.generate_presigned_url(
                "get_object",
                Params={"Bucket": BUCKET, "Key": keys[index % len(keys)]},
                ExpiresIn=expiry,
            )

    service_rates, bare_rates = [], []
    for _ in range(rounds):
        bare_rates.append(await timed(calls, bare))
        service_rates.append(await timed(calls, through_service))
    return median_rate(service_rates), median_rate(bare_rates)


async def bench_presign_cold(settings, client, ids: list[str], rounds: int) -> tuple[float, float]:
    """(service rate, bare rate) for ids this process has not seen: each call checks existence
    (local stat, else a HEAD) on a worker thread before signing."""
    keys = [f"character_references/{image_id}.png" for image_id in ids]
    service_rates, bare_rates = [], []
    for _ in range(rounds):
        backend = get_storage_backend(settings)  # a fresh process knows no keys yet
        service = AssetPersistenceService(backend, settings=settings)

        async def through_service(service: AssetPersistenceService = service) -> None:
            for image_id in ids:
                assert await service.get_character_reference_url(image_id) is not None

        async def bare() -> None:
            for key in keys:
                client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": BUCKET, "Key": key},
                    ExpiresIn=settings.presigned_url_expiry,
                )

        bare_rates.append(await timed(len(ids), bare))
        service_rates.append(await timed(len(ids), through_service))
        backend.close()
    return median_rate(service_rates), median_rate(bare_rates)


async def bench_persist(
    service: AssetPersistenceService, client, pngs: list[Path], concurrency: int, rounds: int
) -> dict[str, float]:
    """MB/s of: the service; bare put_object of the same two objects it writes (image and
    sidecar); bare put_object of the image alone. Plus the average image size in MB."""
    total_mb = sum(path.stat().st_size for path in pngs) / 1e6
    sidecar = b"{" + b'"x": 0, ' * 60 + b"}"  # about the size of a real sidecar
    pool = ThreadPoolExecutor(concurrency)
    loop = asyncio.get_running_loop()

    def put_image(path: Path) -> None:
        with path.open("rb") as body:
            client.put_object(
                Bucket=BUCKET, Key=f"bare/{uuid.uuid4()}.png", Body=body, ContentType="image/png"
            )

    def put_image_and_sidecar(path: Path) -> None:
        put_image(path)
        client.put_object(
            Bucket=BUCKET,
            Key=f"bare/{uuid.uuid4()}.json",
            Body=sidecar,
            ContentType="application/json",
        )

    def bare(put: Callable[[Path], None]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await asyncio.gather(*(loop.run_in_executor(pool, put, path) for path in pngs))

        return run

    async def through_service() -> None:
        limit = asyncio.Semaphore(concurrency)

        async def one(path: Path) -> None:
            async with limit:
                await service.persist_character_reference(str(uuid.uuid4()), path)

        await asyncio.gather(*(one(path) for path in pngs))

    rates: dict[str, list[float]] = {"service": [], "same_objects": [], "image_only": []}
    for _ in range(rounds):
        rates["image_only"].append(await timed(1, bare(put_image)) * total_mb)
        rates["same_objects"].append(await timed(1, bare(put_image_and_sidecar)) * total_mb)
        rates["service"].append(await timed(1, through_service) * total_mb)
    pool.shutdown()
    result = {name: median_rate(values) for name, values in rates.items()}
    result["average_mb"] = total_mb / len(pngs)
    return result


async def measure(
    rounds: int = 5, presign_calls: int = 2000, presign_images: int = 300, persist_images: int = 24
) -> list[Row]:
    """Presigning and persisting through the service against bare boto3, as report rows."""
    server, endpoint = start_moto_server()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            scratch_dir = Path(scratch)
            settings = load_settings(
                _env_file=None,
                storage_backend="s3",
                storage_bucket=BUCKET,
                aws_endpoint_url=endpoint,
                output_dir=scratch_dir / "outputs",
            )
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            client = make_s3_client(
                region=settings.aws_region, endpoint_url=endpoint, max_pool_connections=32
            )
            client.create_bucket(Bucket=BUCKET)
            backend = get_storage_backend(settings)
            service = AssetPersistenceService(backend, settings=settings)

            small = scratch_dir / "small.png"
            Image.effect_noise((64, 64), 50).convert("RGB").save(small)
            ids = [str(uuid.uuid4()) for _ in range(presign_images)]
            for image_id in ids:
                await service.persist_character_reference(image_id, small)
            pngs = make_pngs(scratch_dir, persist_images)

            rows = [
                Row(
                    "presign vs bare boto3 generate_presigned_url",
                    *await bench_presign(service, client, ids, presign_calls, rounds),
                    "URLs/s",
                    True,
                    "keys this process stored",
                ),
                Row(
                    "presign, keys new to the process, vs bare boto3",
                    *await bench_presign_cold(settings, client, ids, rounds),
                    "URLs/s",
                    True,
                    "includes an existence check bare boto3 skips",
                ),
            ]
            for concurrency in (1, 4):
                persist = await bench_persist(service, client, pngs, concurrency, rounds)
                size = f"{persist['average_mb']:.1f} MB PNGs"
                persist_vs = f"persist, {concurrency} in flight, vs bare boto3 put_object"
                rows.append(
                    Row(
                        f"{persist_vs} (image + sidecar)",
                        persist["service"],
                        persist["same_objects"],
                        "MB/s",
                        True,
                        size,
                    )
                )
                rows.append(
                    Row(
                        f"{persist_vs} (image only)",
                        persist["service"],
                        persist["image_only"],
                        "MB/s",
                        True,
                        size,
                    )
                )
            backend.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presign-calls", type=int, default=2000)
    parser.add_argument("--presign-images", type=int, default=300)
    parser.add_argument("--persist-images", type=int, default=24)
    arguments = parser.parse_args()
    print_table(
        asyncio.run(
            measure(
                arguments.rounds,
                arguments.presign_calls,
                arguments.presign_images,
                arguments.persist_images,
            )
        )
    )

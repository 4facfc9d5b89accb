"""Generation benchmark on the tiny local model: the API end to end against the bare pipeline.

Run with `make bench` (or, from backend/, `python ../bench/generation.py`). Both sides use the
same tiny FLUX-family pipeline, built once into a temp dir and loaded through the real
`from_pretrained` path on the CPU, and generate 4 images at 1024x1024 with 4 steps:

- bare: `pipeline(...)` with exactly the arguments DiffusersGenerator passes (PIL output);
- API: POST /api/mv/generate_character_reference (validation, the worker-thread batch,
  PNG encoding, storage of 4 images and 4 sidecars, URLs, the JSON reply) in local mode, with
  and without base64 in the reply, and in S3 mode against a moto server in its own process.

Rounds alternate between the rows; each figure is the median. The ratio is API / bare, so the
overhead of encoding, storing and replying is (ratio - 1) of the generation itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi.testclient import TestClient  # noqa: E402
from report import Row, print_table  # noqa: E402

from config import load_settings  # noqa: E402
from main import create_app  # noqa: E402
from services.generation.base import GenerationRequest  # noqa: E402
from services.generation.generators.local import DiffusersGenerator  # noqa: E402
from services.storage import make_s3_client  # noqa: E402
from tools.make_tiny_model import build  # noqa: E402

BODY = {"character_description": "a silver metallic humanoid robot", "num_images": 4, "seed": 1}


def time_once(run: Callable[[], object], rounds: list[float]) -> None:
    """Time one call of `run` and append it to `rounds`."""
    started = time.perf_counter()
    run()
    rounds.append(time.perf_counter() - started)


def measure(rounds: int = 5, with_s3: bool = True) -> list[Row]:
    """The API end to end against the bare pipeline, as report rows."""
    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    model = build(work / "tiny-flux", "flux")

    # The bare pipeline, driven with the generator's own arguments.
    generator = DiffusersGenerator(str(model), "cpu")
    assert generator.load() is None
    request = GenerationRequest.of_prompt("bench", (1, 2, 3, 4), "1:1")
    arguments = generator.call_arguments(request)
    pipeline = generator.pipeline

    def bare() -> None:
        fresh = generator.call_arguments(request)  # fresh torch.Generators, same seeds
        pipeline(**fresh)

    clients: dict[str, TestClient] = {}
    moto = None
    settings = load_settings(
        local_model_id=str(model), local_device="cpu", output_dir=work / "local"
    )
    clients["API, local storage"] = TestClient(create_app(settings))
    if with_s3:
        from run import start_moto_server  # the storage benchmark's moto server

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = "bench"  # moto accepts any credentials
        moto, endpoint = start_moto_server()
        make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3_settings = load_settings(
            local_model_id=str(model),
            local_device="cpu",
            output_dir=work / "s3",
            storage_backend="s3",
            storage_bucket="bench",
            aws_endpoint_url=endpoint,
        )
        clients["API, S3 storage (moto)"] = TestClient(create_app(s3_settings))

    rows: dict[str, list[float]] = {"bare pipeline": []}
    for name in clients:
        rows[name] = []
        rows[name + ", no base64"] = []
    try:
        for client in clients.values():
            client.__enter__()
            assert client.post("/api/mv/generate_character_reference", json=BODY).status_code == 200
        bare()  # warm-up
        for _ in range(rounds):
            time_once(bare, rows["bare pipeline"])
            for name, client in clients.items():
                without_base64 = {**BODY, "include_base64": False}
                for suffix, body in (("", BODY), (", no base64", without_base64)):

                    def call(client: TestClient = client, body: dict = body) -> None:
                        reply = client.post("/api/mv/generate_character_reference", json=body)
                        assert reply.status_code == 200, reply.text

                    time_once(call, rows[name + suffix])
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
        generator.close()
        if moto is not None:
            moto.kill()

    bare_s = statistics.median(rows.pop("bare pipeline"))
    steps = arguments.get("num_inference_steps")
    return [
        Row(
            f"generation end to end vs bare pipeline: {name}",
            statistics.median(seconds),
            bare_s,
            "s",
            False,
            f"tiny FLUX, 4 images 1024x1024, {steps} steps, CPU",
        )
        for name, seconds in rows.items()
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3-mode row")
    options = parser.parse_args()
    print_table(measure(options.rounds, with_s3=not options.no_s3))

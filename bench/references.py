"""Turnaround benchmark on the tiny FLUX.2 [klein] model: the API end to end against the bare
pipeline call with the same arguments.

Run with `make bench` (or, from backend/, `python ../bench/references.py`). A stored reference
image (768x768) and a 4-view turnaround sheet (front, three-quarter, side, back) at 1024x1024:

- bare: `pipeline(...)` with exactly the arguments DiffusersGenerator passes for that request
  (the four view prompts, one CPU-seeded generator per image, the decoded reference);
- API: POST /api/mv/generate_character_reference with `reference_image_ids` and
  `"views": "turnaround"` in local mode (validation, reading and checking the reference from
  storage, the worker-thread batch, PNG encoding, storage of 4 images and 4 sidecars, the
  JSON reply, without base64).

Rounds alternate between the two; each figure is the median; the ratio is API / bare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi.testclient import TestClient  # noqa: E402
from generation import time_once  # noqa: E402
from report import Row, print_table  # noqa: E402

from config import load_settings  # noqa: E402
from main import create_app  # noqa: E402
from mv.character_reference import TURNAROUND, build_prompt  # noqa: E402
from services.generation.base import GenerationRequest, ReferenceImage  # noqa: E402
from services.generation.generators.local import DiffusersGenerator  # noqa: E402
from tools.make_tiny_model import build  # noqa: E402

DESCRIPTION = "the same character"
SEED = 11


def _reference_png() -> bytes:
    """A 768x768 photo-like PNG: smooth gradients with noise, as a real picture compresses."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 768)
    pixels = np.stack([*np.meshgrid(ramp, ramp[::-1]), np.full((768, 768), 128.0)], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(rounds: int = 5) -> list[Row]:
    """A turnaround sheet through the API against the bare pipeline call, as a report row."""
    work = Path(tempfile.mkdtemp(prefix="bench-references-"))
    model = build(work / "tiny-flux2-klein", "flux2-klein")
    reference = _reference_png()

    settings = load_settings(
        local_model_id=str(model),
        local_device="cpu",
        image_generator="local",
        output_dir=work / "local",
    )
    client = TestClient(create_app(settings))
    generator = DiffusersGenerator(str(model), "cpu")
    assert generator.load() is None
    seconds: dict[str, list[float]] = {"bare": [], "api": []}
    with client:
        upload = client.post(
            "/api/mv/upload_character_reference",
            files={"file": ("reference.png", reference, "image/png")},
        )
        reference_id = upload.json()["id"]
        body = {
            "character_description": DESCRIPTION,
            "reference_image_ids": [reference_id],
            "views": "turnaround",
            "seed": SEED,
            "include_base64": False,
        }
        request = GenerationRequest(
            prompts=tuple(build_prompt(DESCRIPTION, view, 1) for view in TURNAROUND),
            seeds=tuple(SEED + i for i in range(len(TURNAROUND))),
            aspect_ratio="1:1",
            references=(ReferenceImage(reference_id, reference),),
        )
        pipeline = generator.pipeline

        def bare() -> None:
            pipeline(**generator.call_arguments(request))  # fresh generators, same seeds

        def api() -> None:
            reply = client.post("/api/mv/generate_character_reference", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["metadata"]["parameters_used"]["batch_images"] == 4

        api()  # warm-up, both sides
        bare()
        for _ in range(rounds):
            time_once(bare, seconds["bare"])
            time_once(api, seconds["api"])
        steps = generator.call_arguments(request).get("num_inference_steps")
    generator.close()
    return [
        Row(
            "4-view turnaround from a reference via API vs bare pipeline",
            statistics.median(seconds["api"]),
            statistics.median(seconds["bare"]),
            "s",
            False,
            f"tiny FLUX.2 klein, 4 images 1024x1024 + 1 reference, {steps} steps, CPU",
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    print_table(measure(parser.parse_args().rounds))

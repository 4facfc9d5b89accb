"""Worker-tier benchmark: the API in front of the Ray Serve worker app, against baselines
measured in the same run.

Run with `make bench` (or, from backend/ and inside a private network namespace,
`tools/private_network.sh python ../bench/worker_tier.py`). A single-node Ray cluster runs
the worker app with the tiny FLUX-family model on the CPU (4 steps at 1024x1024); the API runs
as its own uvicorn process (IMAGE_GENERATOR=worker), and a second API process runs the same
model in-process. Rows:

- cross-request batching: 8 concurrent one-image requests through the API and the worker
  (images/s), against the bare pipeline making the same 8 images in one call (the batch the
  worker forms with its default WORKER_MAX_BATCH_IMAGES of 8);
- worker path overhead: one 4-image request end to end via the worker, against the same
  request on the API with the pipeline in its own process;
- /health p99 and max of the worker-mode API while 4 four-image generations run on the
  worker, against the same API idle;
- with CUDA: real-size FLUX.2 [klein] 4B, FLUX.1-schnell and SDXL-Turbo (random weights) in
  the worker app, 1, 4 and 8 concurrent one-image requests, images/s against the bare
  pipeline at the same batch, with the share of the GPU's bf16 peak (MFU).

Without a private network namespace (Ray must not listen beyond loopback) it returns no rows.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(BENCH_DIR))

from health_under_load import health_latencies, health_while_generating, percentile  # noqa: E402
from report import Row, print_table  # noqa: E402
from servers import free_port, start_listening  # noqa: E402

from config import load_settings  # noqa: E402
from services.generation.base import GenerationRequest  # noqa: E402
from services.generation.diffusion import DiffusionModel  # noqa: E402
from services.generation.worker_protocol import TOKEN_HEADER, Done, EventReader  # noqa: E402
from tools.make_tiny_model import build  # noqa: E402

GENERATE = "/api/mv/generate_character_reference"
DESCRIPTION = "a silver metallic humanoid robot"
TOKEN = secrets.token_urlsafe(24)


def private_network() -> bool:
    """Whether this process runs where only loopback exists (where Ray may listen)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def ray_cluster() -> AbstractContextManager[str]:
    """A single-node Ray cluster with Serve's proxy on 127.0.0.1; its base URL."""
    from gpu_worker.cluster import serve_on_ray

    quiet = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    return serve_on_ray(
        "127.0.0.1",
        free_port(),
        import_paths=[BENCH_DIR],  # the GPU rows' loader lives here
        env_vars=quiet,
        logging_level="ERROR",
        log_to_driver=False,
    )


def api_process(work: Path, name: str, **settings: str) -> tuple[Any, httpx.Client]:
    """A uvicorn process of the API with `settings`; it and a client, once it is ready."""
    env = {
        **os.environ,
        "OUTPUT_DIR": str(work / name),
        "STORAGE_BACKEND": "local",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "INSTANCE_NAME": name,
        **settings,
    }
    process, url = start_listening(
        lambda port: [
            sys.executable,
            *("-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)),
        ],
        env={**env, "PYTHONPATH": str(BACKEND_DIR)},
    )
    client = httpx.Client(base_url=url, timeout=300)
    deadline = time.monotonic() + 120
    while client.get("/ready").status_code != 200:
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the {name} API did not become ready")
        time.sleep(0.2)
    return process, client


def timed(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def concurrent_generations(base_url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST every body at once to the sync route; the replies (each must be a 200)."""

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            replies = await asyncio.gather(*(client.post(GENERATE, json=b) for b in bodies))
        for reply in replies:
            assert reply.status_code == 200, reply.text
        return [reply.json() for reply in replies]

    return asyncio.run(run())


def measure(rounds: int = 3, idle_requests: int = 500) -> list[Row]:
    """The worker-tier rows (CPU, tiny model), then the GPU rows when CUDA is present."""
    if not private_network():
        print("worker-tier rows: skipped, not in a private network namespace", file=sys.stderr)
        return []
    from ray import serve

    from gpu_worker.app import build_app

    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    model_path = build(work / "tiny-flux", "flux")
    bare = DiffusionModel.load(str(model_path), "cpu")
    rows: list[Row] = []
    with ray_cluster() as proxy:
        settings = load_settings(
            local_model_id=str(model_path), local_device="cpu", worker_token=TOKEN
        )
        serve.run(build_app(settings=settings), name="bench", route_prefix="/bench")
        worker_url = f"{proxy}/bench"
        worker_api, worker_client = api_process(
            work, "worker-api", IMAGE_GENERATOR="worker", WORKER_URL=worker_url, WORKER_TOKEN=TOKEN
        )
        local_api, local_client = api_process(
            work,
            "local-api",
            IMAGE_GENERATOR="local",
            LOCAL_MODEL_ID=str(model_path),
            LOCAL_DEVICE="cpu",
        )
        try:
            rows += _batching_row(bare, str(worker_client.base_url), rounds)
            rows += _overhead_row(worker_client, local_client, rounds)
            rows += _health_rows(worker_client, idle_requests)
        finally:
            for process in (worker_api, local_api):
                process.terminate()
                process.wait(30)
        rows += gpu_rows(proxy, rounds)
    return rows


def _one_image_bodies(seeds: range) -> list[dict[str, Any]]:
    return [
        {"character_description": DESCRIPTION, "num_images": 1, "seed": s, "include_base64": False}
        for s in seeds
    ]


def _batching_row(bare: DiffusionModel, api_url: str, rounds: int) -> list[Row]:
    """8 concurrent one-image requests via the worker, against one bare call of 8 (the batch
    the worker forms with its default WORKER_MAX_BATCH_IMAGES)."""
    prompt_requests = [
        GenerationRequest.of_prompt(DESCRIPTION, (seed,), "1:1") for seed in range(8)
    ]

    def bare_one_call() -> None:
        bare.pipeline(**bare.call_arguments(prompt_requests))

    bodies = _one_image_bodies(range(100, 108))
    concurrent_generations(api_url, bodies)  # warm-up
    bare_one_call()
    bare_s, api_s, sizes = [], [], []
    for _ in range(rounds):
        bare_s.append(timed(bare_one_call))
        started = time.perf_counter()
        replies = concurrent_generations(api_url, bodies)
        api_s.append(time.perf_counter() - started)
        sizes += [reply["metadata"]["parameters_used"]["batch_images"] for reply in replies]
    return [
        Row(
            "cross-request batching: 8 one-image requests via API + worker vs bare 1 x 8",
            8 / statistics.median(api_s),
            8 / statistics.median(bare_s),
            "images/s",
            True,
            f"batch_images seen {sorted(set(sizes))}; PNG, stored, no base64; goal >= 0.8",
        )
    ]


def _overhead_row(worker: httpx.Client, local: httpx.Client, rounds: int) -> list[Row]:
    """One 4-image request via the worker against the pipeline in the API process."""
    body = {"character_description": DESCRIPTION, "num_images": 4, "seed": 1}

    def via(client: httpx.Client) -> Callable[[], None]:
        def call() -> None:
            reply = client.post(GENERATE, json=body)
            assert reply.status_code == 200, reply.text

        return call

    via(worker)()  # warm-up
    via(local)()
    worker_s, local_s = [], []
    for _ in range(rounds):
        worker_s.append(timed(via(worker)))
        local_s.append(timed(via(local)))
    return [
        Row(
            "worker path overhead: 4-image request via worker vs in-process",
            statistics.median(worker_s),
            statistics.median(local_s),
            "s",
            False,
            "tiny FLUX 1024x1024, 4 steps, CPU; goal <= 1.15",
        )
    ]


def _health_rows(worker: httpx.Client, idle_requests: int) -> list[Row]:
    """/health of the worker-mode API while 4 generations run on the worker, against idle."""
    idle = health_latencies(worker, idle_requests)
    body = {"character_description": DESCRIPTION, "num_images": 4, "seed": 1}
    loaded, busy_s = health_while_generating(worker, body, 4)
    note = f"{len(loaded)} requests over {busy_s:.0f} s of 4 generations on the worker"
    return [
        Row(
            "/health p99 while the worker generates vs idle (API, worker mode)",
            percentile(loaded, 0.99),
            percentile(idle, 0.99),
            "ms",
            False,
            note + "; goal <= 2",
        ),
        Row(
            "/health max while the worker generates vs idle (API, worker mode)",
            max(loaded),
            max(idle),
            "ms",
            False,
        ),
    ]


# ---------------------------------------------------------------- GPU rows


def real_size_loader(name: str, model_id: str, device: str) -> Any:
    """A worker loader that builds a real-size architecture on the GPU (random bf16 weights)."""
    import gpu_generation

    factories = {model: factory for model, _, factory, _ in gpu_generation.MODELS}
    return gpu_generation.built_on_gpu(factories[name])


def gpu_rows(proxy: str, rounds: int) -> list[Row]:
    """Real-size models in the worker app: 1, 4 and 8 concurrent one-image requests, images/s
    against the bare pipeline at the same batch, and MFU; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    import gpu_generation

    rows = []
    for name, model_id, factory, _ in gpu_generation.MODELS:
        # The bare pipeline first, then freed: the replica builds its own on the same GPU.
        flops_per_image, bare_rates = _bare_gpu_rates(model_id, factory, rounds)
        torch.cuda.empty_cache()
        rows += _worker_gpu_rows(proxy, name, model_id, flops_per_image, bare_rates, rounds)
    return rows


GPU_BATCHES = (1, 4, 8)


def _bare_gpu_rates(
    model_id: str, factory: Callable[[], Any], rounds: int
) -> tuple[float, dict[int, float]]:
    """FLOPs of one image, and the bare pipeline's images/s at each batch."""
    import gpu_generation
    from torch.utils.flop_counter import FlopCounterMode

    bare = DiffusionModel(gpu_generation.built_on_gpu(factory), model_id, "cuda")
    requests = [
        GenerationRequest.of_prompt(DESCRIPTION, (seed,), "1:1") for seed in range(max(GPU_BATCHES))
    ]

    def call(batch: int) -> Callable[[], object]:
        return lambda: bare.pipeline(**bare.call_arguments(requests[:batch]))

    counter = FlopCounterMode(display=False)
    with counter:
        call(1)()
    rates = {}
    for batch in GPU_BATCHES:
        call(batch)()  # warm-up
        rates[batch] = batch / statistics.median(gpu_generation.timed(call(batch), rounds))
    return counter.get_total_flops(), rates


def _worker_gpu_rows(
    proxy: str,
    name: str,
    model_id: str,
    flops_per_image: float,
    bare_rates: dict[int, float],
    rounds: int,
) -> list[Row]:
    """The worker app on the real-size model: images/s and MFU at each batch."""
    import gpu_generation
    import torch
    from ray import serve

    from gpu_worker.deployments import DiffusionWorker, WorkerIngress

    worker = DiffusionWorker.options(
        max_ongoing_requests=2 * max(GPU_BATCHES),
        ray_actor_options={"num_gpus": 1, "num_cpus": 1},
        user_config={"max_batch_images": max(GPU_BATCHES), "batch_wait_seconds": 0.2},
    ).bind(model_id, "cuda", functools.partial(real_size_loader, name))
    app = f"gpu-{name}"
    serve.run(WorkerIngress.bind(worker, TOKEN), name=app, route_prefix="/gpu")
    url = proxy + "/gpu/generate"
    rows = []
    try:
        for batch in GPU_BATCHES:

            def run(batch: int = batch) -> None:
                direct_worker_requests(url, batch)

            run()  # warm-up
            rate = batch / statistics.median([timed(run) for _ in range(rounds)])
            mfu = flops_per_image * rate / 1e12 / gpu_generation.SPEC_PEAK_TFLOPS
            rows.append(
                Row(
                    f"real-size {name} in the worker app, {batch} concurrent one-image requests",
                    rate,
                    bare_rates[batch],
                    "images/s",
                    True,
                    f"MFU {mfu:.1%} of {gpu_generation.SPEC_PEAK_TFLOPS:g} TFLOPS bf16 peak; "
                    f"{torch.cuda.get_device_name()}",
                )
            )
    finally:
        serve.delete(app)
    return rows


def direct_worker_requests(url: str, count: int) -> None:
    """`count` one-image requests straight to the worker at once, read to their `done`."""

    async def one(client: httpx.AsyncClient, seed: int) -> None:
        body = {"prompts": [DESCRIPTION], "seeds": [seed]}
        reader = EventReader()
        events = []
        async with client.stream("POST", url, json=body) as reply:
            assert reply.status_code == 200
            async for chunk in reply.aiter_bytes():
                events += reader.feed(chunk)
        assert isinstance(events[-1], Done), events[-1]

    async def run() -> None:
        async with httpx.AsyncClient(headers={TOKEN_HEADER: TOKEN}, timeout=600) as client:
            await asyncio.gather(*(one(client, seed) for seed in range(count)))

    asyncio.run(run())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    print_table(measure(options.rounds))

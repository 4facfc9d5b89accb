"""The GPU worker tier on a real Ray cluster: the worker app (Serve, @serve.batch) running the
tiny models on the CPU, and the API in front of it, all over real HTTP on 127.0.0.1.

Two worker apps share the session's cluster: `fast` (tiny SDXL-Turbo: 4 steps at 512x512;
a batch waits 0.5 s for company, so concurrent requests meet) and `slow` (a tiny SDXL with the
pipeline's own 50 steps at 1024x1024, about 4 s: long enough to cancel or kill a generation;
its queue holds two requests, so shedding is easy to reach).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from config import BACKEND_DIR, load_settings
from conftest import ENV_TEST, ApiHarness, blocks_png, free_port, is_ray_process, wait_until
from fake_replicate import FakeReplicate
from live_server import serve
from main import create_app
from services.generation.base import GenerationRequest, ReferenceImage
from services.generation.generators.local import DiffusersGenerator
from services.generation.worker_protocol import (
    STREAM_MEDIA_TYPE,
    TOKEN_HEADER,
    EventReader,
    WorkerEvent,
)
from tools.make_tiny_model import build

pytestmark = pytest.mark.ray

TOKEN = "worker-token-for-tests-only"
GENERATE = "/api/mv/generate_character_reference"
JOBS = "/api/mv/character_reference_jobs"
DESCRIPTION = "a silver metallic humanoid robot with a red shield"


@dataclass
class WorkerApp:
    """One deployed worker app: its WORKER_URL and what its replica says of itself."""

    url: str

    def info(self) -> dict[str, Any]:
        """The replica's /ready reply (model, device, replica, pid, pipeline calls)."""
        reply = httpx.get(self.url + "/ready", headers={TOKEN_HEADER: TOKEN}, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def stream(self, seeds: list[int], **body: Any) -> contextlib.AbstractContextManager:
        """A raw POST /generate stream (httpx), open while the context lasts."""
        payload = {"prompts": [DESCRIPTION] * len(seeds), "seeds": seeds, **body}
        return httpx.stream(
            "POST",
            self.url + "/generate",
            json=payload,
            headers={TOKEN_HEADER: TOKEN},
            timeout=60,
        )


def deploy(base_url: str, name: str, model: Path, **overrides: Any) -> WorkerApp:
    """Deploy the worker app for `model` under /{name}; return it once its replica is up."""
    from ray import serve

    from gpu_worker.app import build_app

    settings = load_settings(
        _env_file=ENV_TEST,
        local_model_id=str(model),
        local_device="cpu",
        worker_token=TOKEN,
        **overrides,
    )
    serve.run(build_app(settings=settings), name=name, route_prefix=f"/{name}")
    return WorkerApp(f"{base_url}/{name}")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline with the pipeline's own defaults (50 steps, 1024x1024, guidance)."""
    return build(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def fast_worker(ray_serve: str, tiny_sdxl_turbo: Path) -> WorkerApp:
    """The `fast` worker app (see the module docstring)."""
    return deploy(ray_serve, "fast", tiny_sdxl_turbo, worker_batch_wait_seconds=0.5)


@pytest.fixture(scope="session")
def slow_worker(ray_serve: str, tiny_sdxl: Path) -> WorkerApp:
    """The `slow` worker app (see the module docstring)."""
    return deploy(
        ray_serve,
        "slow",
        tiny_sdxl,
        worker_max_queued_requests=2,
        worker_batch_wait_seconds=0.3,
    )


@pytest.fixture
def worker_api(make_api: Callable[..., ApiHarness]) -> Callable[..., ApiHarness]:
    """An API (TestClient) in worker mode in front of a worker app."""

    def factory(worker: WorkerApp, mode: str = "local", **overrides: Any) -> ApiHarness:
        overrides.setdefault("image_generator", "worker")
        overrides.setdefault("worker_token", TOKEN)
        return make_api(mode, worker_url=worker.url, **overrides)

    return factory


def pixels(data: bytes | str) -> np.ndarray:
    """An encoded image (raw or base64) as a signed array, to compare by level."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def events_of(reply: httpx.Response) -> list[WorkerEvent]:
    """Every event of a worker stream, parsed."""
    reader = EventReader()
    events = [event for chunk in reply.iter_bytes() for event in reader.feed(chunk)]
    assert reader.complete
    return events


async def async_events(reply: httpx.Response) -> AsyncIterator[WorkerEvent]:
    """The events of a worker stream, as they arrive."""
    reader = EventReader()
    async for chunk in reply.aiter_bytes():
        for event in reader.feed(chunk):
            yield event


# --------------------------------------------------------------- the worker app


def test_worker_streams_progress_then_encoded_images_then_done(fast_worker: WorkerApp) -> None:
    with fast_worker.stream([5, 6], aspect_ratio="16:9", output_format="webp") as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith(STREAM_MEDIA_TYPE)
        events = events_of(reply)
    kinds = [event.event for event in events]
    assert kinds == ["accepted"] + ["progress"] * 4 + ["image", "image", "done"]
    assert [(e.step, e.total_steps) for e in events[1:5]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    images = events[5:7]
    assert [image.seed for image in images] == [5, 6]
    for image in images:  # encoded on the worker, in the requested format and size
        assert image.content_type == "image/webp"
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert (decoded.format, decoded.size) == ("WEBP", (672, 384))
    done = events[-1]
    assert done.parameters["family"] == "sdxl-turbo"
    assert done.parameters["batch_images"] == 2
    assert events[0].replica == fast_worker.info()["replica"]


def test_worker_routes_but_health_need_the_token(fast_worker: WorkerApp) -> None:
    assert httpx.get(fast_worker.url + "/health").json() == {"status": "ok"}
    for headers in ({}, {TOKEN_HEADER: TOKEN[:-1]}, {TOKEN_HEADER: TOKEN + "x"}):
        assert httpx.get(fast_worker.url + "/ready", headers=headers).status_code == 401
        body = {"prompts": ["x"], "seeds": [1]}
        reply = httpx.post(fast_worker.url + "/generate", json=body, headers=headers)
        assert reply.status_code == 401
        assert reply.json()["detail"]["error"] == "Unauthorized"
    info = fast_worker.info()
    assert info["status"] == "ready"
    assert info["device"] == "cpu"
    assert info["family"] == "sdxl-turbo"
    assert info["max_batch_images"] == 8
    assert info["max_references"] == 0  # SDXL-Turbo: text to image only
    assert info["replica"] and info["pid"] > 0


@pytest.mark.parametrize(
    ("token", "what"), [(TOKEN[::-1], "is not the worker's token"), (None, "is missing")]
)
def test_the_api_names_a_token_the_worker_refuses(
    worker_api: Callable[..., ApiHarness], fast_worker: WorkerApp, token: str | None, what: str
) -> None:
    api = worker_api(fast_worker, worker_token=token)
    ready = api.client.get("/ready")
    assert ready.status_code == 503
    assert any(f"WORKER_TOKEN {what}" in problem for problem in ready.json()["problems"])
    reply = api.client.post(GENERATE, json={"character_description": DESCRIPTION})
    assert reply.status_code == 503
    assert f"WORKER_TOKEN {what}" in reply.json()["detail"]["message"]


def test_worker_refuses_a_malformed_request_by_field(fast_worker: WorkerApp) -> None:
    headers = {TOKEN_HEADER: TOKEN}
    reply = httpx.post(
        fast_worker.url + "/generate", json={"prompts": ["x"], "seeds": []}, headers=headers
    )
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "seeds"]


# --------------------------------------------------------------- through the API


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_generate_through_the_worker_stores_and_serves_the_images(
    mode: str, worker_api: Callable[..., ApiHarness], fast_worker: WorkerApp, tiny_sdxl_turbo: Path
) -> None:
    api = worker_api(fast_worker, mode)
    body = {"character_description": DESCRIPTION, "num_images": 2, "seed": 21}
    reply = api.client.post(GENERATE, json=body)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "worker"
    assert metadata["model_used"] == str(tiny_sdxl_turbo)
    assert metadata["parameters_used"]["batch_images"] == 2
    assert metadata["parameters_used"]["worker_replica"] == fast_worker.info()["replica"]
    images = reply.json()["images"]
    for image in images:
        served = api.fetch(image["url"])
        assert served.status_code == 200
        assert served.content == base64.b64decode(image["base64"])
        if api.s3 is not None:
            stored = api.s3.get_object(Bucket=api.settings.storage_bucket, Key=image["path"])
            assert stored["Body"].read() == served.content
    # The same pipeline code in this process gives the same pixels for the same seeds.
    local = DiffusersGenerator(str(tiny_sdxl_turbo), "cpu")
    assert local.load() is None
    prompt = metadata["parameters_used"]["prompt"]
    negative = metadata["parameters_used"]["negative_prompt"]
    request = GenerationRequest.of_prompt(prompt, (21, 22), "1:1", negative_prompt=negative)
    in_process = asyncio.run(local.generate(request))
    local.close()
    for image, made_here in zip(images, in_process.images, strict=True):
        assert made_here.pixels is not None
        difference = np.abs(pixels(image["base64"]) - np.asarray(made_here.pixels, np.int16))
        assert difference.max() <= 1


def test_concurrent_requests_share_pipeline_calls_and_keep_their_pixels(
    make_settings: Callable[..., Any], fast_worker: WorkerApp
) -> None:
    settings = make_settings(
        image_generator="worker",
        worker_url=fast_worker.url,
        worker_token=TOKEN,
        generation_workers=None,  # the worker-mode default: enough to batch
    )
    seeds = [31, 41, 51, 61]

    async def generate(client: httpx.AsyncClient, seed: int) -> dict[str, Any]:
        body = {"character_description": DESCRIPTION, "num_images": 1, "seed": seed}
        reply = await client.post(GENERATE, json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    async def together(base_url: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return list(await asyncio.gather(*(generate(client, seed) for seed in seeds)))

    async def one_by_one(base_url: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return [await generate(client, seed) for seed in seeds]

    with serve(create_app(settings)) as base_url:
        calls_before = fast_worker.info()["pipeline_calls"]["run"]
        batched = asyncio.run(together(base_url))
        calls = fast_worker.info()["pipeline_calls"]["run"] - calls_before
        alone = asyncio.run(one_by_one(base_url))

    sizes = [reply["metadata"]["parameters_used"]["batch_images"] for reply in batched]
    assert calls < len(seeds), f"{calls} pipeline calls for {len(seeds)} requests"
    assert max(sizes) > 1
    assert [reply["metadata"]["parameters_used"]["batch_images"] for reply in alone] == [1] * 4
    for together_reply, alone_reply in zip(batched, alone, strict=True):
        in_batch = pixels(together_reply["images"][0]["base64"])
        by_itself = pixels(alone_reply["images"][0]["base64"])
        assert np.abs(in_batch - by_itself).max() <= 1
        assert by_itself.std() > 5  # real images, not a constant that matches trivially


@pytest.fixture(scope="session")
def klein_worker(ray_serve: str, tiny_klein: Path) -> WorkerApp:
    """A worker app on the tiny FLUX.2 [klein] pipeline, which takes reference images."""
    return deploy(ray_serve, "klein", tiny_klein, worker_batch_wait_seconds=0.5)


def test_references_travel_to_the_worker_and_batch_only_with_their_own(
    make_settings: Callable[..., Any], klein_worker: WorkerApp, tiny_klein: Path
) -> None:
    assert klein_worker.info()["max_references"] == 4
    settings = make_settings(
        image_generator="worker",
        worker_url=klein_worker.url,
        worker_token=TOKEN,
        generation_workers=None,
    )
    references = [blocks_png(1), blocks_png(2)]

    async def run(base_url: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            ids = []
            for data in references:
                files = {"file": ("ref.png", data, "image/png")}
                ids.append(
                    (await client.post("/api/mv/upload_character_reference", files=files)).json()[
                        "id"
                    ]
                )

            async def generate(reference: str, seed: int) -> dict[str, Any]:
                body = {
                    "character_description": "the same character waving",
                    "reference_image_ids": [reference],
                    "num_images": 1,
                    "seed": seed,
                }
                reply = await client.post(GENERATE, json=body)
                assert reply.status_code == 200, reply.text
                return reply.json()

            # Two requests with the first reference, one with the second, all at once.
            return list(
                await asyncio.gather(generate(ids[0], 5), generate(ids[0], 6), generate(ids[1], 5))
            )

    with serve(create_app(settings)) as base_url:
        first, same_reference, other_reference = asyncio.run(run(base_url))
    sizes = [r["metadata"]["parameters_used"]["batch_images"] for r in (first, same_reference)]
    # A call takes one set of references: the other reference's request ran in its own.
    assert other_reference["metadata"]["parameters_used"]["batch_images"] == 1
    assert sizes in ([1, 1], [2, 2])
    # The worker made what this process makes from the same request.
    local = DiffusersGenerator(str(tiny_klein), "cpu")
    assert local.load() is None
    parameters = first["metadata"]["parameters_used"]
    reference_id = first["metadata"]["reference_image_ids"][0]
    request = GenerationRequest.of_prompt(
        parameters["prompt"],
        (5,),
        "1:1",
        references=(ReferenceImage(reference_id, references[0]),),
    )
    made_here = asyncio.run(local.generate(request)).images[0].pixels
    local.close()
    worker_pixels = pixels(first["images"][0]["base64"])
    assert np.abs(worker_pixels - np.asarray(made_here, np.int16)).max() <= 1
    other = pixels(other_reference["images"][0]["base64"])
    assert np.abs(worker_pixels - other).mean() > 2  # the reference reached the worker


def wait_for_status(
    api: ApiHarness, status_url: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """Poll a generation's status until `check` holds; that status."""
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(api.client.get(status_url).json())
        return check(found)

    wait_until(done, timeout)
    return found


def test_progress_comes_from_the_workers_steps(
    worker_api: Callable[..., ApiHarness], slow_worker: WorkerApp
) -> None:
    api = worker_api(slow_worker)
    body = {"character_description": DESCRIPTION, "num_images": 1, "seed": 7}
    status_url = api.client.post(JOBS, json=body).json()["status_url"]
    running = wait_for_status(
        api, status_url, lambda s: s["status"] == "running" and (s["progress"] or {}).get("step")
    )
    assert running["progress"]["total_steps"] == 50
    assert 0 < running["progress"]["fraction"] < 1
    finished = wait_for_status(api, status_url, lambda s: s["status"] != "running")
    assert finished["status"] == "succeeded", finished
    assert finished["progress"]["step"] == 50
    assert finished["result"]["metadata"]["backend"] == "worker"


def test_cancel_while_running_stops_the_worker_at_its_next_step(
    worker_api: Callable[..., ApiHarness], slow_worker: WorkerApp
) -> None:
    api = worker_api(slow_worker)
    stopped_before = slow_worker.info()["pipeline_calls"]["stopped"]
    body = {"character_description": DESCRIPTION, "num_images": 1, "seed": 8}
    status_url = api.client.post(JOBS, json=body).json()["status_url"]
    wait_for_status(api, status_url, lambda s: (s["progress"] or {}).get("step", 0) >= 2)
    canceled_at = time.monotonic()
    assert api.client.delete(status_url).json()["status"] == "canceled"
    # The closed stream reached the replica, which stopped the call well before its 50 steps.
    wait_until(lambda: slow_worker.info()["pipeline_calls"]["stopped"] == stopped_before + 1, 10)
    assert time.monotonic() - canceled_at < 3
    assert list(api.client.app.state.assets.storage.list_keys("character_references/")) == []


def test_a_canceled_request_sharing_a_call_is_discarded_and_the_others_finish(
    slow_worker: WorkerApp,
) -> None:
    stopped_before = slow_worker.info()["pipeline_calls"]["stopped"]

    async def run() -> tuple[list[Any], int]:
        headers = {TOKEN_HEADER: TOKEN}
        async with httpx.AsyncClient(base_url=slow_worker.url, headers=headers, timeout=60) as c:

            async def keep() -> list[Any]:
                body = {"prompts": [DESCRIPTION], "seeds": [1]}
                async with c.stream("POST", "/generate", json=body) as reply:
                    return [event async for event in async_events(reply)]

            async def leave() -> int:
                body = {"prompts": [DESCRIPTION], "seeds": [2]}
                async with c.stream("POST", "/generate", json=body) as reply:
                    async for event in async_events(reply):
                        if event.event == "progress" and event.step >= 2:
                            return event.step  # and close the stream: the caller goes away

            return await asyncio.gather(keep(), leave())

    kept, _ = asyncio.run(run())
    assert [event.event for event in kept][-2:] == ["image", "done"]
    assert kept[-1].parameters["batch_images"] == 2  # the canceled request's image was made too
    assert slow_worker.info()["pipeline_calls"]["stopped"] == stopped_before


@pytest.fixture
def saturated_slow_worker(slow_worker: WorkerApp) -> Iterator[WorkerApp]:
    """The slow worker with no place left: 16 requests running (max_ongoing_requests, twice
    the batch), 2 queued; all canceled after.

    Opened one at a time: Serve counts a request as queued until a replica takes it, so a
    burst could be shed while places are still free. A request shed while an earlier test's
    canceled requests are still leaving the queue is opened again; once all are released, the
    fixture waits until the worker takes a request again, so the next test finds it free.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    client = httpx.AsyncClient(base_url=slow_worker.url, headers={TOKEN_HEADER: TOKEN}, timeout=60)

    async def hold(seed: int, accepted: asyncio.Event) -> None:
        body = {"prompts": [DESCRIPTION], "seeds": [seed]}
        while True:
            async with client.stream("POST", "/generate", json=body) as reply:
                if reply.status_code == 429:  # canceled requests are still leaving the queue
                    await asyncio.sleep(0.05)
                    continue
                assert reply.status_code == 200
                accepted.set()  # headers come with `accepted`: a replica took the request
                await asyncio.Event().wait()  # until canceled, which closes the stream

    async def open_one(seed: int, wait: bool) -> asyncio.Task[None]:
        accepted = asyncio.Event()
        task = asyncio.create_task(hold(seed, accepted))
        if wait:
            taken = asyncio.ensure_future(accepted.wait())
            await asyncio.wait({task, taken}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            taken.cancel()
            if task.done():
                task.result()  # raises what stopped it
            assert accepted.is_set(), f"the worker took no request (seed {seed}) in 30 s"
        else:
            await asyncio.sleep(0.3)  # time to reach the queue
        return task

    running = 2 * slow_worker.info()["max_batch_images"]
    holders = []
    try:
        for seed in range(running + 2):
            opened = asyncio.run_coroutine_threadsafe(open_one(seed, wait=seed < running), loop)
            holders.append(opened.result(timeout=60))
        yield slow_worker
    finally:

        async def release() -> None:
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            probe = await open_one(len(holders), wait=True)  # taken: the queue is free again
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await client.aclose()

        asyncio.run_coroutine_threadsafe(release(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_serve_backpressure_is_a_429_with_retry_after(
    worker_api: Callable[..., ApiHarness], saturated_slow_worker: WorkerApp
) -> None:
    direct = httpx.post(
        saturated_slow_worker.url + "/generate",
        json={"prompts": ["x"], "seeds": [1]},
        headers={TOKEN_HEADER: TOKEN},
        timeout=30,
    )
    assert direct.status_code == 429
    assert int(direct.headers["Retry-After"]) >= 1
    api = worker_api(saturated_slow_worker)
    reply = api.client.post(GENERATE, json={"character_description": DESCRIPTION, "num_images": 1})
    assert reply.status_code == 429, reply.text
    assert int(reply.headers["Retry-After"]) >= 1
    assert reply.json()["detail"]["error"] == "WorkerBusy"


def test_overflow_to_replicate_takes_what_the_worker_sheds(
    worker_api: Callable[..., ApiHarness], saturated_slow_worker: WorkerApp
) -> None:
    replicate = FakeReplicate()
    api = worker_api(saturated_slow_worker, replicate=replicate, overflow_to_replicate=True)
    reply = api.client.post(GENERATE, json={"character_description": DESCRIPTION, "num_images": 2})
    assert reply.status_code == 200, reply.text
    metadata = reply.json()["metadata"]
    assert metadata["backend"] == "replicate"
    assert "is at capacity" in metadata["fallback_reason"]
    assert len(replicate.inputs) == 2


def test_the_api_process_imports_neither_torch_nor_ray_in_worker_mode(
    fast_worker: WorkerApp, tmp_path: Path
) -> None:
    script = f"""
import json, sys
from fastapi.testclient import TestClient
from main import create_app
with TestClient(create_app()) as client:
    reply = client.post("{GENERATE}", json={{"character_description": "a fox", "num_images": 1}})
loaded = [name for name in ("torch", "diffusers", "transformers", "ray") if name in sys.modules]
print(json.dumps({{"status": reply.status_code, "backend": reply.json()["metadata"]["backend"],
                  "loaded": loaded}}))
"""
    env = {
        **os.environ,
        "IMAGE_GENERATOR": "worker",
        "WORKER_URL": fast_worker.url,
        "WORKER_TOKEN": TOKEN,
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "INSTANCE_NAME": "worker-mode-check",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BACKEND_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"status": 200, "backend": "worker", "loaded": []}


def test_a_worker_killed_mid_generation_fails_cleanly_and_the_next_request_succeeds(
    worker_api: Callable[..., ApiHarness], slow_worker: WorkerApp
) -> None:
    api = worker_api(slow_worker)
    killed_pid = slow_worker.info()["pid"]
    body = {"character_description": DESCRIPTION, "num_images": 1, "seed": 9}
    status_url = api.client.post(JOBS, json=body).json()["status_url"]
    wait_for_status(api, status_url, lambda s: (s["progress"] or {}).get("step", 0) >= 2)
    os.kill(killed_pid, signal.SIGKILL)
    failed = wait_for_status(api, status_url, lambda s: s["status"] != "running", timeout=30)
    assert failed["status"] == "failed"
    assert failed["error"]["status_code"] == 503
    assert f"WORKER_URL={slow_worker.url}" in failed["error"]["message"]
    assert list(api.client.app.state.assets.storage.list_keys("character_references/")) == []
    # Serve replaces the replica; once it answers, generation works again.
    wait_until(lambda: _replica_pid(slow_worker) not in (None, killed_pid), timeout=120)
    reply = api.client.post(GENERATE, json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"]["backend"] == "worker"


def _replica_pid(worker: WorkerApp) -> int | None:
    reply = httpx.get(worker.url + "/ready", headers={TOKEN_HEADER: TOKEN}, timeout=30)
    return reply.json()["pid"] if reply.status_code == 200 else None


def _ray_processes() -> set[int]:
    """Pids of every process of any Ray cluster on this machine."""
    import psutil

    return {process.pid for process in psutil.process_iter() if is_ray_process(process)}


MAKE_WORKER = [sys.executable, "-m", "gpu_worker"]  # what `make worker` runs, from backend/


def make_worker_env(model: Path, **settings: str) -> dict[str, str]:
    """The environment of a `make worker` of its own cluster, on a free port."""
    env = {
        **os.environ,
        "LOCAL_MODEL_ID": str(model),
        "LOCAL_DEVICE": "cpu",
        "WORKER_PORT": str(free_port()),
        **settings,
    }
    env.pop("RAY_ADDRESS", None)
    return env


def test_make_worker_serves_prints_its_url_logs_json_and_leaves_nothing_behind(
    tiny_sdxl_turbo: Path, ray_serve: str, tmp_path: Path
) -> None:
    others = _ray_processes()  # the session's own cluster stays
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        command = subprocess.Popen(
            MAKE_WORKER,
            cwd=BACKEND_DIR,
            env=make_worker_env(tiny_sdxl_turbo, LOG_FORMAT="json", LOG_LEVEL="INFO"),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        printed = ""
        deadline = time.monotonic() + 180
        while "make run" not in printed and time.monotonic() < deadline:
            line = command.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break  # it exited
            printed += line
        match = re.search(r"WORKER_URL=(\S+) WORKER_TOKEN=(\S+) make run", printed)
        assert match, printed + errors.read_text()[-4000:]
        url, token = match.groups()
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        ready = httpx.get(url + "/ready", headers={TOKEN_HEADER: token}, timeout=30)
        assert ready.json()["model"] == str(tiny_sdxl_turbo)
        assert len(token) >= 16  # made for the run, since none was set
        # A description longer than CLIP's 77 tokens: the tokenizer warns, a known noise.
        long_prompt = " ".join(["a dancer in a long red coat with brass buttons"] * 12)
        with httpx.stream(
            "POST",
            url + "/generate",
            json={"prompts": [long_prompt], "seeds": [3]},
            headers={TOKEN_HEADER: token},
            timeout=60,
        ) as reply:
            assert reply.status_code == 200
            assert b'{"event":"done"' in b"".join(reply.iter_bytes())
        # The ingress replica's access line reaches the driver through Ray's log monitor.
        wait_until(lambda: "POST /generate 200" in errors.read_text(), timeout=30)
    finally:
        command.send_signal(signal.SIGINT)
        assert command.wait(120) == 0
    wait_until(lambda: not (_ray_processes() - others), timeout=60)

    # Every line on stderr is a JSON record: the driver's, Ray's, Serve's and the replicas'.
    records = [json.loads(line) for line in errors.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
    by_logger = {record["logger"] for record in records}
    loaded = [r for r in records if r["logger"] == "gpu_worker.deployments"]
    assert loaded[0]["message"].startswith(f"loaded {tiny_sdxl_turbo} on cpu")  # a replica's own
    serve_lines = [r for r in records if r["logger"] == "gpu_worker.ray_workers"]
    assert {"ServeController", "ProxyActor"} <= {r["ray_process"] for r in serve_lines}
    assert any("POST /generate 200" in r["message"] for r in serve_lines)
    assert "gpu_worker" in by_logger  # "stopping the worker tier"
    # The API's noise filter applies in the replicas too.
    assert not [r for r in records if "Token indices sequence length" in r["message"]]
    assert not [r for r in records if "Autoscaler status" in r["message"]]


@pytest.mark.parametrize(
    ("settings", "status", "message"),
    [
        ({"LOCAL_MODEL_ID": "/nonexistent/model"}, 1, "the worker app did not start"),
        pytest.param(
            {"LOCAL_DEVICE": "auto"},
            2,
            "LOCAL_DEVICE=auto needs a GPU and this Ray cluster has none",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only cluster"),
        ),
    ],
)
def test_make_worker_says_why_it_cannot_start(
    settings: dict[str, str], status: int, message: str, tiny_sdxl_turbo: Path, ray_serve: str
) -> None:
    result = subprocess.run(
        MAKE_WORKER,
        cwd=BACKEND_DIR,
        env=make_worker_env(tiny_sdxl_turbo, **settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == status, result.stderr[-2000:]
    assert message in result.stderr

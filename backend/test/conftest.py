"""Shared fixtures: isolated settings, every storage mode behind one fixture, test images."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import hypothesis
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis.configuration import set_hypothesis_home_dir
from moto import mock_aws
from moto.server import ThreadedMotoServer
from PIL import Image

from atomic_moto import make_conditional_writes_atomic
from config import REPO_ROOT, Settings, load_settings
from fake_replicate import FakeReplicate
from main import create_app
from routers.errors import ErrorReply
from services.asset_persistence import AssetPersistenceService
from services.generation.base import (
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
)
from services.generation.diffusion import load_pipeline
from services.generation.policy import GenerationPolicy, build_generation_policy
from services.storage import StorageBackend, get_storage_backend
from services.storage.s3 import make_s3_client

ENV_TEST = REPO_ROOT / ".env.test"

# Hypothesis keeps its example database and caches in the working directory (the source
# tree) unless told otherwise: no database, and its caches in a temp dir.
hypothesis.settings.register_profile("suite", database=None)
hypothesis.settings.load_profile("suite")
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))
SETTING_NAMES = tuple(name.upper() for name in Settings.model_fields)
# moto, in-process and as a server, decides conditional writes atomically, as S3 does.
make_conditional_writes_atomic()


@pytest.fixture(autouse=True)
def _isolated_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's settings and AWS credentials out of offline tests."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    if request.node.get_closest_marker("integration"):
        return
    nowhere = str(Path("/nonexistent") / "aws")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # No session token: ministack refuses one for the account's own keys, as S3 would a
    # token that STS never issued.
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    # No test may reach a model hub: every model is built by the tests themselves.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings from .env.test, with the local tier in a temp dir and any overrides."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("output_dir", tmp_path / "outputs")
        return load_settings(_env_file=ENV_TEST, **overrides)

    return factory


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server on 127.0.0.1 (random port), for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


MINISTACK_PYTHON = REPO_ROOT / ".venv" / "ministack" / "bin" / "python"
# The credentials every offline test uses (see _isolated_environment); ministack checks
# signatures against them.
TEST_AWS_KEY = TEST_AWS_SECRET = "testing"


@pytest.fixture(scope="session")
def ministack_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ministack's S3 on 127.0.0.1 (random port), for the whole session: a second S3
    implementation, which checks signatures, expiry and checksums where moto does not."""
    if not MINISTACK_PYTHON.exists():
        pytest.fail(f"ministack is not installed at {MINISTACK_PYTHON}: run `make test`")
    log = tmp_path_factory.mktemp("ministack") / "ministack.log"
    for _ in range(3):  # a port taken between choosing it and binding it: choose another
        port = free_port()
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(log.parent),
            "TMPDIR": str(log.parent),  # its pid file
            "GATEWAY_PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            "SERVICES": "s3",
            "AUTH": "true",  # signatures and presigned URLs are checked
            "AWS_ACCESS_KEY_ID": TEST_AWS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET,
            "LOG_LEVEL": "WARNING",
        }
        with log.open("ab") as output:
            server = subprocess.Popen(
                [str(MINISTACK_PYTHON), "-m", "ministack"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        endpoint = f"http://127.0.0.1:{port}"
        if _wait_for_health(server, f"{endpoint}/_ministack/health"):
            break
        server.kill()
        server.wait()
    else:
        pytest.fail(f"ministack did not start: {log.read_text()[-2000:]}")
    try:
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_for_health(server: subprocess.Popen[bytes], url: str, timeout: float = 30) -> bool:
    """Whether `server` answers `url` before it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        time.sleep(0.05)
    return False


# The S3 servers every S3-over-HTTP test runs against, and the storage mode of each.
S3_SERVERS = ("moto", "ministack")
HTTP_STORAGE_MODES = {"s3-http": "moto", "s3-ministack": "ministack"}
# make_api's S3 modes, and the server of each.
API_S3_MODES = {"s3": "moto", "s3-ministack": "ministack"}
# Every offline S3 storage mode: moto in-process, then each server over HTTP.
S3_STORAGE_MODES = ["s3-moto", *HTTP_STORAGE_MODES]


def s3_endpoint(request: pytest.FixtureRequest, server: str) -> str:
    """The endpoint of S3 server `server` (started for the session on first use)."""
    return request.getfixturevalue(f"{server}_endpoint")


@pytest.fixture(params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> str:
    """The endpoint of each S3 server in turn."""
    return s3_endpoint(request, request.param)


# A test value only: API keys need a URL signing secret.
TEST_SIGNING_SECRET = "test-url-signing-secret-0123456789abcdef"


def new_bucket_name() -> str:
    """A fresh, valid bucket name."""
    return f"test-{uuid.uuid4().hex[:20]}"


@contextlib.contextmanager
def moto_credentials() -> Iterator[None]:
    """moto's test credentials and no AWS config, for module-scoped fixtures (which are set up
    before the per-test isolation)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.setenv(name, "testing")
        yield


def s3_settings(
    request: pytest.FixtureRequest, *, serve_from_cloud: bool, server: str = "moto"
) -> dict[str, Any]:
    """Settings for S3 on a fresh bucket of an S3 server (over HTTP on 127.0.0.1)."""
    endpoint = s3_endpoint(request, server)
    bucket = new_bucket_name()
    make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return {
        "storage_backend": "s3",
        "storage_bucket": bucket,
        "aws_endpoint_url": endpoint,
        "serve_from_cloud": serve_from_cloud,
    }


@dataclass
class StorageHarness:
    """One storage mode, ready to use: settings, backend, service and a raw S3 client."""

    mode: str
    settings: Settings
    backend: StorageBackend
    service: AssetPersistenceService
    s3: Any | None  # a separate boto3 client to inspect the bucket; None in local mode

    @property
    def is_s3(self) -> bool:
        """Whether the durable tier is S3."""
        return self.s3 is not None

    def s3_object(self, key: str) -> dict[str, Any]:
        """get_object of `key` through the inspection client."""
        assert self.s3 is not None
        return self.s3.get_object(Bucket=self.settings.storage_bucket, Key=key)


def _harness(mode: str, settings: Settings, s3: Any | None) -> StorageHarness:
    backend = get_storage_backend(settings)
    service = AssetPersistenceService(backend, settings=settings)
    return StorageHarness(mode, settings, backend, service, s3)


def _real_bucket_settings(make_settings: Callable[..., Settings]) -> Settings:
    bucket = os.environ.get("STORAGE_BUCKET")
    if not bucket or boto3.session.Session().get_credentials() is None:
        pytest.skip("set STORAGE_BUCKET and AWS credentials to run against a real bucket")
    return make_settings(
        storage_backend="s3",
        storage_bucket=bucket,
        aws_region=os.environ.get("AWS_REGION", "us-east-1"),
        aws_endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
    )


@pytest.fixture(
    params=[
        "local",
        "s3-moto",
        "s3-http",
        "s3-ministack",
        pytest.param("s3-real", marks=pytest.mark.integration),
    ]
)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """The storage mode under test: local; S3 as moto in-process, moto's server or ministack's
    server (both over HTTP on 127.0.0.1); a real bucket."""
    return request.param


@pytest.fixture
def storage(
    storage_mode: str, make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Iterator[StorageHarness]:
    """Every storage mode behind one fixture: local, S3 in-process, S3 over HTTP (two servers),
    real S3."""
    if storage_mode == "local":
        harness = _harness("local", make_settings(), None)
        yield harness
        return
    if storage_mode == "s3-moto":
        with mock_aws():
            settings = make_settings(storage_backend="s3", storage_bucket=new_bucket_name())
            s3 = make_s3_client(region=settings.aws_region)
            s3.create_bucket(Bucket=settings.storage_bucket)
            harness = _harness(storage_mode, settings, s3)
            yield harness
            harness.backend.close()
        return
    if storage_mode in HTTP_STORAGE_MODES:
        endpoint = s3_endpoint(request, HTTP_STORAGE_MODES[storage_mode])
        settings = make_settings(
            storage_backend="s3", storage_bucket=new_bucket_name(), aws_endpoint_url=endpoint
        )
        s3 = make_s3_client(region=settings.aws_region, endpoint_url=endpoint)
        s3.create_bucket(Bucket=settings.storage_bucket)
        harness = _harness(storage_mode, settings, s3)
        yield harness
        harness.backend.close()
        return
    settings = _real_bucket_settings(make_settings)
    s3 = make_s3_client(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)
    harness = _harness(storage_mode, settings, s3)
    yield harness
    # Remove what the test wrote: the local tier mirrors every key it sent.
    for key in harness.backend.list_keys(""):
        if key.startswith(("character_references/", "jobs/")):
            s3.delete_object(Bucket=settings.storage_bucket, Key=key)
    harness.backend.close()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `condition` every 0.1 s; fail the test if it stays false for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def assert_error_shape(body: Any, error: str | None = None) -> dict[str, Any]:
    """`body` is `{"detail": {"error", "message", ...}}` (with `error` when given), as the
    OpenAPI document declares it: one of the error names it lists, no other field."""
    ErrorReply.model_validate(body)
    detail = body["detail"]
    assert isinstance(detail, dict), body
    assert isinstance(detail["error"], str) and detail["error"]
    assert isinstance(detail["message"], str) and detail["message"]
    if error is not None:
        assert detail["error"] == error, body
    return detail


def photo_like_png(width: int = 1024, height: int = 768) -> bytes:
    """A large PNG with smooth gradients and some texture, like a generated picture."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 24)
    image = Image.merge("RGB", (gradient, noise, gradient.rotate(90).resize((width, height))))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def blocks_png(seed: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """An image of random 32 px colour blocks: each seed a visibly different picture."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((32, 32, 1), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(image_format: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    """A small real image in the given Pillow format."""
    image = Image.effect_noise(size, 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a real image file into a temp dir and return its path."""

    def factory(name: str = "image.png", image_format: str = "PNG") -> Path:
        path = tmp_path / "sources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(image_format))
        return path

    return factory


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight FLUX pipeline on disk, built once per session."""
    from tools.make_tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", "flux")


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight FLUX.2 [klein] pipeline (takes references), built once per session."""
    from tools.make_tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-flux2-klein", "flux2-klein")


@pytest.fixture(scope="session")
def tiny_sdxl_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL pipeline (turbo defaults by its name), built once per session."""
    from tools.make_tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-sdxl-turbo", "sdxl")


class _OutOfMemoryPipeline:
    """The real pipeline, except that a call raises what CUDA raises when memory runs out.

    CUDA memory exhaustion cannot happen on a CPU-only machine, so it is injected here.
    """

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, **_: Any) -> Any:
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def out_of_memory_loader(model_id: str, device: str) -> Any:
    """load_pipeline, then make every call run out of memory."""
    return _OutOfMemoryPipeline(load_pipeline(model_id, device))


class BlockingGenerator:
    """An ImageGenerator (the real interface) whose requests wait until `release` is set."""

    name = "replicate"
    model = "fake/blocking"
    total_steps = 10
    references_taken = 4

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.requests: list[GenerationRequest] = []

    def start(self) -> None:
        """Nothing to prepare."""

    async def unavailable_reason(self) -> str | None:
        """Always available."""
        return None

    def known_unavailable_reason(self) -> str | None:
        """Always available."""
        return None

    def max_references(self) -> int:
        """Takes references, like the default models."""
        return self.references_taken

    def describe(self) -> dict[str, Any]:
        """Its name."""
        return {"model": self.model}

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """Report a step every 20 ms until `release` is set (or it is canceled), then return
        small images."""
        progress = progress or GenerationProgress()
        self.calls += 1
        self.requests.append(request)
        self.started.set()
        step = 0
        while not self.release.is_set():
            progress.advance(min(step, self.total_steps - 1), self.total_steps)
            step += 1
            await asyncio.sleep(0.02)
        progress.advance(self.total_steps, self.total_steps)
        images = tuple(
            GeneratedImage(seed, Image.new("RGB", (8, 8), (seed % 256, 0, 0)))
            for seed in request.seeds
        )
        return GenerationResult(images, self.model, "replicate")

    async def aclose(self) -> None:
        """Let any waiting request finish."""
        self.release.set()


@dataclass
class ApiHarness:
    """A running app (TestClient), its settings, and its S3 bucket when in S3 mode."""

    client: TestClient
    settings: Settings
    s3: Any | None
    replicate: FakeReplicate | None

    def fetch(self, url: str) -> httpx.Response:
        """GET an image URL: through the app for API paths, over HTTP for presigned URLs."""
        if url.startswith("/"):
            return self.client.get(url)
        return httpx.get(url)


@pytest.fixture
def make_api(
    make_settings: Callable[..., Settings],
    tiny_sdxl_turbo: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., ApiHarness]]:
    """Start apps in local or S3 mode (moto's server, or with "s3-ministack" ministack's, over
    HTTP), with the tiny SDXL-Turbo model."""
    stack = contextlib.ExitStack()

    def factory(
        mode: str = "local",
        *,
        replicate: FakeReplicate | None = None,
        worker: httpx.AsyncBaseTransport | None = None,
        local_loader: Callable[[str, str], Any] = load_pipeline,
        generators: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> ApiHarness:
        s3 = None
        if mode in API_S3_MODES:
            endpoint = s3_endpoint(request, API_S3_MODES[mode])
            overrides.setdefault("storage_bucket", new_bucket_name())
            overrides["storage_backend"] = "s3"
            overrides.setdefault("aws_endpoint_url", endpoint)  # a FaultyProxy in fault tests
            s3 = make_s3_client(region="us-east-1", endpoint_url=endpoint)
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=overrides["storage_bucket"])
        overrides.setdefault("local_model_id", str(tiny_sdxl_turbo))
        overrides.setdefault("local_device", "cpu")
        if overrides.get("api_keys"):
            overrides.setdefault("url_signing_secret", TEST_SIGNING_SECRET)
        if replicate is not None:
            overrides.setdefault("replicate_api_token", "r8_test-token")
        settings = make_settings(**overrides)
        if generators is None:
            policy = build_generation_policy(
                settings,
                local_loader=local_loader,
                replicate_transport=replicate.transport() if replicate else None,
                worker_transport=worker,
            )
        else:
            policy = GenerationPolicy(
                settings.image_generator,
                generators,
                timeout_seconds=settings.generation_timeout_seconds,
            )
        client = stack.enter_context(TestClient(create_app(settings, generation_policy=policy)))
        # Closed on the app's event loop, whose connections its HTTP clients hold.
        stack.callback(lambda: client.portal.call(policy.aclose))
        return ApiHarness(client, settings, s3, replicate)

    with stack:
        yield factory


# ------------------------------------------------------------------ Ray


def private_network_problem() -> str | None:
    """Why a Ray cluster may not start here: it needs a network with nothing but loopback."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names == ["lo"]:
        return None
    return (
        "the Ray suite runs only in a private network namespace with nothing but loopback "
        "(`make test` provides one with unshare -rn where the machine allows it); this "
        f"namespace has {', '.join(names)}"
    )


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    """One Ray cluster per session, with Serve's HTTP proxy on 127.0.0.1; its base URL.

    Skips, saying why, outside a private network namespace. Shut down, every Ray process
    with it, when the session ends.
    """
    if (problem := private_network_problem()) is not None:
        pytest.skip(problem)
    from gpu_worker.cluster import serve_on_ray

    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # no replica reaches a hub
    with serve_on_ray(
        "127.0.0.1", free_port(), env_vars=offline, num_cpus=8, logging_level="WARNING"
    ) as url:
        yield url
    _no_ray_process_left()


def is_ray_process(process: Any) -> bool:
    """Whether a psutil process is one of a Ray cluster's (raylet, GCS, a worker, a helper)."""
    import psutil

    try:
        command = " ".join(process.cmdline())
        name = process.name()
    except psutil.Error:  # gone meanwhile
        return False
    ray_file = "site-packages/ray/" in command  # its binaries and scripts
    return command.startswith("ray::") or ray_file or name in ("raylet", "gcs_server")


def _no_ray_process_left(timeout: float = 30) -> None:
    """Fail (after killing them) if processes this session's cluster started outlive it.

    Only Ray's: the session's other servers (ministack) are this process's children too.
    """
    import psutil

    deadline = time.monotonic() + timeout
    while left := [p for p in psutil.Process().children(recursive=True) if is_ray_process(p)]:
        if time.monotonic() > deadline:
            names = sorted({process.name() for process in left})
            for process in left:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            raise AssertionError(f"Ray processes outlived ray.shutdown(): {names}")
        time.sleep(0.2)

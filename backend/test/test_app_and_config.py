"""Settings validation, the app's system routes and start-up, the server command and the example."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from config import (
    BACKEND_DIR,
    DEFAULT_OUTPUT_DIR,
    REPO_ROOT,
    Settings,
    SettingsError,
    load_settings,
)
from conftest import ENV_TEST, StorageHarness, image_bytes, new_bucket_name
from main import create_app
from services.storage import WriteThroughStorageBackend
from services.storage.s3 import make_s3_client
from version import __version__


@pytest.mark.parametrize("expiry", [1, 3600, 604_800])
def test_presigned_expiry_inside_bounds_is_accepted(expiry: int) -> None:
    assert load_settings(_env_file=None, presigned_url_expiry=expiry).presigned_url_expiry == expiry


@pytest.mark.parametrize("expiry", ["0", "-1", "604801", "soon"])
def test_presigned_expiry_outside_bounds_is_refused(
    expiry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRESIGNED_URL_EXPIRY", expiry)
    with pytest.raises(SettingsError, match="PRESIGNED_URL_EXPIRY"):
        load_settings(_env_file=None)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("STORAGE_BACKEND", "ftp", "STORAGE_BACKEND='ftp'"),
        ("STORAGE_BUCKET", "Not_A_Bucket", "STORAGE_BUCKET"),
        ("AWS_ENDPOINT_URL", "localhost:9000", "AWS_ENDPOINT_URL"),
        ("PUBLIC_BASE_URL", "ftp://x", "PUBLIC_BASE_URL"),
        ("IMAGE_GENERATOR", "gpu", "IMAGE_GENERATOR"),
        ("LOCAL_DEVICE", "tpu", "LOCAL_DEVICE"),
        ("REPLICATE_MODEL", "no-slash", "REPLICATE_MODEL"),
        ("S3_MAX_ATTEMPTS", "0", "S3_MAX_ATTEMPTS"),
    ],
)
def test_invalid_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings(_env_file=None)


def test_s3_mode_requires_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "s3")
    with pytest.raises(SettingsError, match="STORAGE_BUCKET must be set"):
        load_settings(_env_file=None)


def test_output_dir_does_not_depend_on_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(_env_file=None).output_dir == DEFAULT_OUTPUT_DIR
    monkeypatch.setenv("OUTPUT_DIR", "data/out")
    assert load_settings(_env_file=None).output_dir == BACKEND_DIR / "data" / "out"


def test_secrets_never_appear_in_errors_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_supersecret")
    monkeypatch.setenv("PRESIGNED_URL_EXPIRY", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)
    assert "supersecret" not in str(raised.value)
    monkeypatch.delenv("PRESIGNED_URL_EXPIRY")
    assert "supersecret" not in repr(load_settings(_env_file=None))


def test_env_test_holds_only_test_values() -> None:
    settings = load_settings(_env_file=ENV_TEST)
    assert settings.replicate_api_token is None
    assert settings.storage_backend == "local"


def test_env_example_documents_every_setting() -> None:
    documented = {
        line.split("=", 1)[0]
        for line in (REPO_ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert documented == {name.upper() for name in Settings.model_fields}
    assert load_settings(_env_file=REPO_ROOT / ".env.example")  # and its values are valid


def test_health_and_version(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/health").json() == {"status": "ok"}
        version = client.get("/version").json()
        assert version["version"] == __version__
        assert version["name"] == "mv-backend"


@pytest.mark.parametrize("storage_mode", ["s3-http", "s3-ministack"])
def test_startup_uploads_pending_objects(storage: StorageHarness) -> None:
    backend = storage.backend
    assert isinstance(backend, WriteThroughStorageBackend)
    key = f"character_references/{uuid.uuid4()}.png"
    backend.local.put_bytes(key, b"waiting", "image/png")
    backend.pending.add(key, "image/png", "simulated outage")
    with TestClient(create_app(storage.settings, storage_backend=backend)):
        deadline = time.monotonic() + 10
        while backend.is_pending(key) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not backend.is_pending(key)
    assert storage.s3_object(key)["Body"].read() == b"waiting"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"STORAGE_BACKEND", "STORAGE_BUCKET"}}
    env.update(OUTPUT_DIR=str(tmp_path / "outputs"), **extra)
    return env


def test_server_command_runs_the_flow_with_the_tiny_model(tmp_path: Path, tiny_flux: Path) -> None:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command,
        cwd=BACKEND_DIR,
        env=_server_env(tmp_path, LOCAL_MODEL_ID=str(tiny_flux), LOCAL_DEVICE="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        generated = httpx.post(
            f"{base}/api/mv/generate_character_reference",
            json={"character_description": "a robot", "num_images": 1, "seed": 42},
            timeout=60,
        )
        assert generated.status_code == 200, generated.text
        image = generated.json()["images"][0]
        fetched = httpx.get(base + image["url"], timeout=10)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert fetched.content == base64.b64decode(image["base64"])
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    ("command", "moved_by"),
    [
        (
            ["-m", "server", "--port", "{port}"],
            "PORT=<another> make run (python -m server --port <another>) moves this server",
        ),
        (["-m", "gpu_worker"], "WORKER_PORT=<another> make worker moves the worker tier"),
        (
            ["-m", "tools.moto_server"],
            "MOTO_PORT=<another> moves moto "
            "(and AWS_ENDPOINT_URL=http://127.0.0.1:<another> points the API at it)",
        ),
    ],
    ids=["make run", "make worker", "moto"],
)
def test_a_port_in_use_is_one_line_naming_the_setting_that_moves_it(
    tmp_path: Path, command: list[str], moved_by: str
) -> None:
    with socket.socket() as taken:  # another server, listening
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, *(part.format(port=port) for part in command)],
            cwd=BACKEND_DIR,
            env=_server_env(
                tmp_path, WORKER_PORT=str(port), MOTO_PORT=str(port), LOCAL_DEVICE="cpu"
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: 127.0.0.1:{port} is in use (another server?); {moved_by}"
    ]


@pytest.mark.parametrize(
    "command",
    [["-c", "import main"], ["-m", "server", "--port", "1"], ["-m", "tools.retention", "verify"]],
    ids=["uvicorn main:app", "python -m server", "tools.retention"],
)
def test_invalid_setting_stops_the_start_with_a_clear_message(
    tmp_path: Path, command: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, *command],
        cwd=BACKEND_DIR,
        env=_server_env(tmp_path, PRESIGNED_URL_EXPIRY="604801"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PRESIGNED_URL_EXPIRY='604801'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_example_script_runs_the_five_methods(
    mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    image = tmp_path / "robot.png"
    image.write_bytes(image_bytes())
    extra = {}
    if mode == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = new_bucket_name()
        make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        extra = {"STORAGE_BACKEND": "s3", "STORAGE_BUCKET": bucket, "AWS_ENDPOINT_URL": endpoint}
    result = subprocess.run(
        [sys.executable, "examples/asset_roundtrip.py", str(image)],
        cwd=BACKEND_DIR,
        env=_server_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"ok: {mode} mode, 2 files identical" in result.stdout
    if mode == "s3":
        assert "X-Amz-Signature" in result.stdout


def test_the_readme_python_api_example_is_the_file_it_runs(tmp_path: Path) -> None:
    example = (BACKEND_DIR / "examples" / "python_api.py").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"```python\n{example}```" in readme, "the README's copy differs from the file"
    image = tmp_path / "robot.png"
    image.write_bytes(image_bytes())
    # As the README says: from backend/, with the venv's Python.
    result = subprocess.run(
        [sys.executable, "examples/python_api.py", str(image)],
        cwd=BACKEND_DIR,
        env=_server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stored = re.search(
        r"^stored: /api/mv/get_character_reference/([0-9a-f-]{36})$", result.stdout, re.M
    )
    assert stored is not None, result.stdout
    image_id = stored.group(1)
    assert f"found: /api/mv/get_character_reference/{image_id}" in result.stdout
    assert f"restored: ['character_reference/{image_id}.png']" in result.stdout


def test_tiny_model_command_builds_a_loadable_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.make_tiny_model import main as make_tiny_model

    target = tmp_path / "tiny"
    assert make_tiny_model([str(target), "--family", "sdxl"]) == 0
    assert "StableDiffusionXLPipeline written to" in capsys.readouterr().out
    assert (target / "model_index.json").is_file()
    assert (target / "unet" / "config.json").is_file()

"""With LOG_FORMAT=json, every line the server process writes is one JSON object, from the
launcher's first line to its last (`python -m server`, `uvicorn main:app`, gunicorn with
uvicorn workers), with no ANSI codes and no known third-party noise, huggingface_hub's
download retries included."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import BACKEND_DIR
from conftest import wait_until
from observability import KNOWN_NOISE
from replicas import process_environment


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Each way the server is started, and the lines that show its first and last moments.
LAUNCHERS = {
    "python -m server": (
        ["-m", "server", "--port", "{port}"],
        ["Started server process", "Finished server process"],
    ),
    "uvicorn main:app": (
        ["-m", "uvicorn", "main:app", "--port", "{port}"],
        ["Started server process", "Finished server process"],
    ),
    "gunicorn, uvicorn workers": (
        # gunicorn.conf.py (read from backend/) sets the worker class and the logger; no
        # control socket (it would go in the home directory)
        [
            *("-m", "gunicorn", "main:app", "--bind", "127.0.0.1:{port}"),
            *("--workers", "2", "--no-control-socket"),
        ],
        ["Starting gunicorn", "Booting worker", "Started server process", "Shutting down: Master"],
    ),
}


@contextlib.contextmanager
def json_server(
    tmp_path: Path, arguments: list[str], settings: dict[str, str]
) -> Iterator[tuple[str, Path]]:
    """A server process with LOG_FORMAT=json on a free port: its URL and its log, which is
    complete once the block ends (the process is stopped with SIGTERM, as a platform does)."""
    port = _free_port()
    environment = process_environment({"LOG_FORMAT": "json", **settings})
    environment.update({"OUTPUT_DIR": str(tmp_path / "outputs"), "HOME": str(tmp_path)})
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, *(argument.format(port=port) for argument in arguments)],
            cwd=BACKEND_DIR,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}", log
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


def json_records(log: Path) -> list[dict]:
    """Every line of `log` as JSON; fails on the first line that is not."""
    text = log.read_text()
    assert "\x1b[" not in text  # no ANSI colour codes
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_every_line_of_the_server_is_json(launcher: str, tmp_path: Path, tiny_flux: Path) -> None:
    arguments, milestones = LAUNCHERS[launcher]
    settings = {"LOCAL_MODEL_ID": str(tiny_flux), "LOCAL_DEVICE": "cpu"}
    with json_server(tmp_path, arguments, settings) as (base, log):
        wait_until(lambda: _status(f"{base}/ready") == 200, timeout=120)
        generated = httpx.post(
            f"{base}/api/mv/generate_character_reference",
            json={"character_description": "a robot " * 40, "num_images": 1},
            timeout=120,
        )
        assert generated.status_code == 200
    records = json_records(log)
    messages = [record["message"] for record in records]
    for milestone in milestones:
        assert any(message.startswith(milestone) for message in messages), milestone
    assert any(record.get("path") == "/api/mv/generate_character_reference" for record in records)
    for _, start in KNOWN_NOISE:
        assert not any(message.startswith(start) for message in messages), start


def test_the_default_models_start_without_network_logs_json(tmp_path: Path) -> None:
    # The default model, not cached, with the hub out of reach (a port nothing listens on):
    # huggingface_hub retries (its own lines) and warns, then the model is reported missing.
    settings = {
        "LOCAL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}",
        "HF_HOME": str(tmp_path / "hf"),
    }
    with json_server(tmp_path, LAUNCHERS["python -m server"][0], settings) as (base, log):
        wait_until(lambda: "downloading it failed" in _ready_text(f"{base}/ready"), timeout=120)
    records = json_records(log)
    retries = [
        record
        for record in records
        if record["logger"].startswith("huggingface_hub") and "Retrying in" in record["message"]
    ]
    assert retries  # the retry lines came, as JSON


def _ready_text(url: str) -> str:
    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None

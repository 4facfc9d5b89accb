"""With LOG_FORMAT=json, every line the server process writes is one JSON object, from
uvicorn's first line to its last, with no ANSI codes and no known third-party noise."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from config import BACKEND_DIR
from conftest import wait_until
from observability import KNOWN_NOISE
from replicas import process_environment


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_line_of_the_server_is_json(tmp_path: Path, tiny_flux: Path) -> None:
    port = _free_port()
    environment = process_environment(
        {
            "LOG_FORMAT": "json",
            "LOCAL_MODEL_ID": str(tiny_flux),
            "LOCAL_DEVICE": "cpu",
            "OUTPUT_DIR": str(tmp_path / "outputs"),
        }
    )
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port)],
            cwd=BACKEND_DIR,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: _status(f"{base}/ready") == 200, timeout=120)
            generated = httpx.post(
                f"{base}/api/mv/generate_character_reference",
                json={"character_description": "a robot " * 40, "num_images": 1},
                timeout=120,
            )
            assert generated.status_code == 200
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # fails on the first line that is not JSON
    assert "\x1b[" not in text
    loggers = {record["logger"] for record in records}
    messages = [record["message"] for record in records]
    assert "uvicorn.error" in loggers
    assert any(message.startswith("Started server process") for message in messages)
    assert any(message.startswith("Finished server process") for message in messages)
    assert any(record.get("path") == "/api/mv/generate_character_reference" for record in records)
    for _, start in KNOWN_NOISE:
        assert not any(message.startswith(start) for message in messages), start


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None

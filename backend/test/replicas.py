"""API replicas as separate uvicorn processes on loopback, sharing only the storage tier."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import REPO_ROOT, Settings
from conftest import new_bucket_name, s3_endpoint
from services.storage import is_temp_file
from services.storage.s3 import make_s3_client

BACKEND_DIR = REPO_ROOT / "backend"
_SETTING_NAMES = {name.upper() for name in Settings.model_fields}
OFFLINE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class Replica:
    """One API process."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class SharedTier:
    """The storage replicas share (one bucket, or one OUTPUT_DIR), read directly."""

    settings: dict[str, str]
    s3: Any | None = None
    bucket: str | None = None
    output_dir: Path | None = None

    def for_machine(self, machine_dir: Path) -> dict[str, str]:
        """Storage settings of one machine: in S3 mode, with a local tier of its own."""
        if self.s3 is None:
            return dict(self.settings)
        return {**self.settings, "OUTPUT_DIR": str(machine_dir)}

    def read(self, key: str) -> bytes:
        """An object as the shared tier holds it."""
        if self.s3 is not None:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        assert self.output_dir is not None
        return (self.output_dir / key).read_bytes()

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (temp files of unfinished writes left out)."""
        if self.s3 is not None:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return [item["Key"] for page in pages for item in page.get("Contents", [])]
        assert self.output_dir is not None
        return [
            path.relative_to(self.output_dir).as_posix()
            for path in (self.output_dir / prefix).rglob("*")
            if path.is_file() and not is_temp_file(path)
        ]


def open_shared_tier(request: pytest.FixtureRequest, mode: str, base: Path) -> SharedTier:
    """A fresh bucket on moto's ("s3") or ministack's ("s3-ministack") server, or one
    OUTPUT_DIR under `base` ("local"). S3 needs OFFLINE_AWS in this process's environment."""
    if mode == "local":
        output_dir = base / "shared"
        settings = {"STORAGE_BACKEND": "local", "OUTPUT_DIR": str(output_dir)}
        return SharedTier(settings, output_dir=output_dir)
    endpoint = s3_endpoint(request, "ministack" if mode == "s3-ministack" else "moto")
    bucket = new_bucket_name()
    s3 = make_s3_client(region="us-east-1", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    settings = {"STORAGE_BACKEND": "s3", "STORAGE_BUCKET": bucket, "AWS_ENDPOINT_URL": endpoint}
    return SharedTier(settings, s3, bucket)


def process_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any setting or AWS variable, plus `settings`."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name not in _SETTING_NAMES and not name.startswith("AWS_")
    }
    return {**inherited, **OFFLINE_AWS, **settings}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(replica: Replica, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise RuntimeError(f"{replica.name} exited:\n{replica.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(replica.url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{replica.name} did not answer /health:\n{replica.log.read_text()[-3000:]}")


def start_replica(name: str, settings: Mapping[str, str], log_dir: Path) -> Replica:
    """Start one uvicorn process with `settings` on a free port (not waiting for it)."""
    port = _free_port()
    log = log_dir / f"{name}.log"
    command = [
        sys.executable, "-m", "uvicorn", "main:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            cwd=BACKEND_DIR,
            env=process_environment({"INSTANCE_NAME": name, **settings}),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return Replica(name, f"http://127.0.0.1:{port}", process, log)


def wait_healthy(replica: Replica, timeout: float = 90) -> None:
    """Wait until `replica` answers /health; RuntimeError (with its log) if it does not."""
    _wait_healthy(replica, timeout)


def stop_replica(replica: Replica) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    replica.process.terminate()
    try:
        replica.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        replica.process.kill()
        replica.process.wait()


@contextlib.contextmanager
def run_replicas(
    settings_by_name: Mapping[str, Mapping[str, str]], log_dir: Path, timeout: float = 90
) -> Iterator[list[Replica]]:
    """Start one uvicorn process per name with its settings; stop them all afterwards."""
    replicas: list[Replica] = []
    try:
        for name, settings in settings_by_name.items():
            replicas.append(start_replica(name, settings, log_dir))
        for replica in replicas:
            _wait_healthy(replica, timeout)
        yield replicas
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            stop_replica(replica)

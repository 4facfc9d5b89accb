"""`make worker`: the worker tier on this machine, until Ctrl-C.

    cd backend && python -m gpu_worker [--host 127.0.0.1]

Starts a single-node Ray cluster (or joins the one RAY_ADDRESS names), deploys the worker
app with the configured model on Serve's HTTP proxy at WORKER_PORT, and prints the settings
the API needs. Without WORKER_TOKEN it makes one for this run and prints it. Ctrl-C (or
SIGTERM) removes the app and, when this command started the cluster, shuts Serve and Ray
down, leaving no process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from config import Settings, SettingsError, load_settings
from gpu_worker.logs import JsonStderr, print_worker_lines_as_json
from observability import configure_logging
from ports import PortUnavailableError, check_port_free
from services.generation.diffusion import brief

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "gpu-worker"
logger = logging.getLogger("gpu_worker")


def main(argv: list[str] | None = None) -> int:
    """Run the worker tier in the foreground; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="where Serve's proxy listens")
    options = parser.parse_args(argv)
    if not os.environ.get("WORKER_TOKEN", "").strip():
        # Made before the settings are read, so the app and the line printed below agree.
        os.environ["WORKER_TOKEN"] = secrets.token_urlsafe(24)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    return _start(settings, options.host)


def _start(settings: Settings, host: str) -> int:
    """Build the app, check the port and serve until a signal; the exit status.

    What stops the start is one plain line on stderr, whatever LOG_FORMAT says.
    """
    try:
        from gpu_worker.app import build_app

        application = build_app()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from ray.exceptions import RayError

    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a cluster of its own: its proxy will take WORKER_PORT
        try:
            check_port_free(host, settings.worker_port)
        except PortUnavailableError as error:
            print(
                f"error: {error}; WORKER_PORT=<another> make worker moves the worker tier",
                file=sys.stderr,
            )
            return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        errors = sys.stderr
        if settings.log_format == "json":  # from here on, Ray writes to the terminal too
            json_stderr = JsonStderr()
            stack.callback(json_stderr.close)
            errors = json_stderr.real
            print_worker_lines_as_json()
        try:
            return _serve(application, settings, host, address, stop, errors)
        except RayError as error:  # Ray or Serve could not start (a port taken, an actor lost)
            print(f"error: the worker tier did not start: {brief(error)}", file=errors)
            return 1


def _serve(
    application: Application,
    settings: Settings,
    host: str,
    address: str | None,
    stop: threading.Event,
    errors: TextIO,
) -> int:
    """Deploy the app on a cluster of its own (or the one at `address`) until `stop` is set;
    what stops it is one line on `errors`."""
    import ray
    from ray import serve

    from gpu_worker.cluster import serve_on_ray
    from gpu_worker.logs import route_ray_logs

    with serve_on_ray(host, settings.worker_port, address=address, logging_level="WARNING") as url:
        route_ray_logs()
        if settings.local_device != "cpu" and not ray.cluster_resources().get("GPU"):
            print(
                f"error: LOCAL_DEVICE={settings.local_device} needs a GPU and this Ray cluster has "
                "none; set LOCAL_DEVICE=cpu with a model small enough for CPUs (make tiny-model)",
                file=errors,
            )
            return 2
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as error:  # the replicas could not start (the model did not load)
            print(f"error: the worker app did not start: {error}", file=errors)
            return 1
        try:
            token = os.environ["WORKER_TOKEN"]
            model = f"{settings.local_model_id} on {settings.local_device}"
            print(f"\nworker tier ready at {url} ({model})")
            print("run the API against it (another terminal):")
            print(
                f"  IMAGE_GENERATOR=worker WORKER_URL={url} WORKER_TOKEN={token} make run\n",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        finally:
            logger.info("stopping the worker tier")
            if address is not None:
                serve.delete(APP_NAME)  # a cluster this command joined keeps running
    return 0


if __name__ == "__main__":
    sys.exit(main())

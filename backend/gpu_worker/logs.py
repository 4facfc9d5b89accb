"""The worker tier's log lines: in LOG_FORMAT, like the API's, with the same noise filter.

A replica sets up its logging as the API does (`configure_replica_logging`): its own lines,
the libraries' and Python's warnings become records of one format, and known noise is dropped.
Ray then prints what each worker process writes on the driver's terminal, every line prefixed
with the process's name, which no JSON reader accepts. So with LOG_FORMAT=json the driver
prints them through its own logging instead (`print_worker_lines_as_json`): a line that is a
JSON object already, such as a replica's own record, goes out as it is; any other line (Serve's
own, a library's print) becomes a record of logger `gpu_worker.ray_workers`, at the level it
names, with the process's pid and name as fields, unless it is known noise. What the driver
process itself writes to its stderr, Ray's C++ core included, is treated the same way
(`JsonStderr`), and Ray's loggers in the driver go through the process's handler (`route_ray_logs`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from typing import Any, TextIO

from config import load_settings
from observability import KNOWN_NOISE, configure_logging
from services.generation.diffusion import route_library_logs

# Not under "ray": Ray's own handler there would print them as text again.
WORKER_LINES_LOGGER = "gpu_worker.ray_workers"
DRIVER_LINES_LOGGER = "gpu_worker.ray_driver"
# The loggers Ray and Serve set up with handlers (and formats) of their own in the driver.
RAY_LOGGERS = ("ray", "ray.serve")
_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_LEVEL_SEARCH_CHARS = 80  # a level names itself near the start of a line, if at all


def configure_replica_logging() -> None:
    """In a replica process: logging as the API sets it up (LOG_FORMAT, LOG_LEVEL, the noise
    filter), the libraries' own handlers removed."""
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    route_library_logs()


def route_ray_logs() -> None:
    """In the driver: Ray's and Serve's log lines through the process's handler."""
    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        ray_logger.handlers = []
        ray_logger.propagate = True


def print_worker_lines_as_json() -> None:
    """In the driver, before `ray.init`: print the worker processes' output (and the errors
    Ray reports of them) as JSON records, not Ray's prefixed lines (see the module docstring).

    Both go through one function of Ray's (ray._private.worker, Ray 2.60), which this replaces.
    """
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: forward_worker_output(data)


class JsonStderr:
    """Every line this process writes to its stderr file descriptor, as a JSON record.

    Ray's core writes to fd 2 directly, from C++, and Ray's Python loggers print in their own
    format before `route_ray_logs` can run. With this in place, fd 2 is a pipe: a line that is
    a JSON object (the process's own records among them) goes to the real stderr as it is, and
    any other becomes a record of logger `gpu_worker.ray_driver`, which comes back as JSON.
    """

    def __init__(self) -> None:
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._out = open(self._real, "w", buffering=1, closefd=False)  # noqa: SIM115
        self.real = self._out  # for what must stay a plain line (a start that failed)
        self._reader = threading.Thread(
            target=self._forward, args=(read_end,), name="json-stderr", daemon=True
        )
        self._reader.start()

    def _forward(self, read_end: int) -> None:
        driver_lines = logging.getLogger(DRIVER_LINES_LOGGER)
        with open(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                forward_line(line.rstrip("\n"), driver_lines, {}, self._out)

    def close(self) -> None:
        """Give fd 2 back to the real stderr, once the lines written so far are printed."""
        sys.stderr.flush()
        os.dup2(self._real, 2)  # the pipe's last write end: the reader reaches its end
        self._reader.join(timeout=5)
        self._out.close()
        os.close(self._real)


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def forward_worker_output(data: dict[str, Any]) -> None:
    """Print one batch of a worker process's output lines (what Ray hands its driver)."""
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status every few seconds: only events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    extra = {"ray_pid": data.get("pid"), "ray_process": data.get("actor_name") or ""}
    worker_lines = logging.getLogger(WORKER_LINES_LOGGER)
    for line in lines:
        forward_line(line, worker_lines, extra)


def forward_line(
    line: str, wrapper: logging.Logger, extra: dict[str, Any], out: TextIO | None = None
) -> None:
    """Print `line` to `out` (stderr) as it is when it is a JSON object, else log it as a
    record of `wrapper` at the level it names (unless it is known noise)."""
    if not line.strip():
        return
    if _is_json_object(line):
        stream = out or sys.stderr
        stream.write(line + "\n")
        stream.flush()
        return
    if any(start in line for _, start in KNOWN_NOISE):  # printed before logging was set up
        return
    level = _LEVEL_WORD.search(line[:_LEVEL_SEARCH_CHARS])
    wrapper.log(logging.getLevelName(level.group(1)) if level else logging.INFO, line, extra=extra)

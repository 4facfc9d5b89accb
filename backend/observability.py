"""Logging: JSON lines carrying the request id and the job or generation id of the work."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
generation_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "generation_id", default=None
)
_CONTEXT = {"request_id": request_id_var, "job_id": job_id_var, "generation_id": generation_id_var}
_STANDARD_ATTRIBUTES = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def bind(**ids: object) -> None:
    """Attach ids (request_id, job_id, generation_id) to every log line of the current task."""
    for name, value in ids.items():
        if value is not None:
            _CONTEXT[name].set(str(value))


def current_ids() -> dict[str, str]:
    """The ids bound to the current task."""
    return {name: value for name, var in _CONTEXT.items() if (value := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, bound ids and `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **current_ids(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRIBUTES and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the bound ids appended."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line (plus a traceback, if any)."""
        ids = " ".join(f"{name}={value}" for name, value in current_ids().items())
        text = super().format(record)
        return f"{text} {ids}" if ids else text


def configure_logging(log_format: str, level: str) -> None:
    """Send every log line, the server's own included, to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        server_logger = logging.getLogger(name)
        server_logger.handlers = []
        server_logger.propagate = True
    # Requests are logged by the app itself, with their ids, status and duration.
    logging.getLogger("uvicorn.access").disabled = True

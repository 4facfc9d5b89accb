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
owner_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("owner", default=None)
_CONTEXT = {
    "request_id": request_id_var,
    "owner": owner_var,
    "job_id": job_id_var,
    "generation_id": generation_id_var,
}
# Record attributes that are not extra fields: the standard ones, and uvicorn's copy of the
# message with ANSI colour codes (for terminals, never for JSON).
_STANDARD_ATTRIBUTES = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}
# Libraries that install their own handler (and format): their lines go through ours instead.
_SELF_HANDLED_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "gunicorn.error",
    "gunicorn.access",
    "transformers",
    "diffusers",
)
# Known third-party messages that say nothing an operator can act on, by logger and start.
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    # Only image *processors* want torchvision; text-to-image pipelines never use them.
    ("transformers", "`CLIPImageProcessor` requires torchvision"),
    ("transformers", "`SiglipImageProcessor` requires torchvision"),
    ("transformers", "`Siglip2ImageProcessor` requires torchvision"),
    # The prompt template is longer than CLIP's 77 tokens by design: T5 reads all of it.
    ("transformers", "Token indices sequence length is longer than"),
    ("diffusers", "The following part of your input was truncated"),
)


def bind(**ids: object) -> None:
    """Attach ids (request_id, owner, job_id, generation_id) to every log line of the current
    task."""
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


class KnownNoiseFilter(logging.Filter):
    """Drops the KNOWN_NOISE messages; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a known third-party message that concerns no operator."""
        message = record.getMessage()
        return not any(
            (record.name == name or record.name.startswith(name + "."))
            and message.startswith(start)
            for name, start in KNOWN_NOISE
        )


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
    handler.addFilter(KnownNoiseFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _SELF_HANDLED_LOGGERS:
        library_logger = logging.getLogger(name)
        library_logger.handlers = []
        library_logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) becomes a line in the same format
    # Requests are logged by the app itself, with their ids, status and duration.
    logging.getLogger("uvicorn.access").disabled = True

"""gunicorn's settings for the API: uvicorn workers, and every line in LOG_FORMAT.

    cd backend && gunicorn main:app --bind 127.0.0.1:8000 --workers 2

gunicorn reads this file from the directory it starts in. Its own lines (the master's and each
worker's) go through the app's handler, as uvicorn's do: with LOG_FORMAT=json, the process
writes nothing but JSON lines, from "Starting gunicorn" to the last worker's exit.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from config import settings_or_exit
from observability import configure_logging

worker_class = "uvicorn_worker.UvicornWorker"


class ServerLogger(Logger):
    """gunicorn's logger, writing through the process's handler in LOG_FORMAT."""

    def setup(self, cfg: Any) -> None:
        """Set up as gunicorn does, then route its loggers to the app's handler."""
        super().setup(cfg)
        settings = settings_or_exit()
        configure_logging(settings.log_format, settings.log_level)


logger_class = ServerLogger

"""Service errors to HTTP replies: one shape, `{"detail": {"error", "message"}}`, no tracebacks."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.generation.base import (
    GenerationBusyError,
    GenerationError,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorUnavailableError,
    ProviderError,
)
from services.image_files import UnsupportedImageError
from services.storage.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)

logger = logging.getLogger(__name__)

# (error class, HTTP status, error name); the first match wins, so subclasses come first.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (GenerationBusyError, 429, "QueueFull"),
    (GeneratorUnavailableError, 503, "GeneratorUnavailable"),
    (GeneratorFailedError, 503, "GeneratorFailed"),
    (ProviderError, 502, "ProviderError"),
    (GenerationTimeoutError, 504, "GenerationTimeout"),
    (GenerationError, 502, "GenerationFailed"),
    (ObjectNotFoundError, 404, "NotFound"),
    (InvalidKeyError, 422, "InvalidId"),
    (UnsupportedImageError, 415, "UnsupportedImage"),
    (StorageUnavailableError, 503, "StorageUnavailable"),
    (StorageError, 502, "StorageError"),
]


def error_response(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    """The JSON error reply every endpoint uses."""
    return JSONResponse(
        {"detail": {"error": error, "message": message}}, status_code=status, headers=headers
    )


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            headers = {}
            if isinstance(exc, GenerationBusyError):
                headers["Retry-After"] = str(exc.retry_after)
            if status >= 500:
                logger.warning("%s %s: %s: %s", request.method, request.url.path, name, exc)
            return error_response(status, name, str(exc), **headers)
    return await _unexpected_error(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Map service errors to statuses; anything unexpected to a bare 500."""
    for kind, _, _ in _STATUS:
        app.add_exception_handler(kind, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)

"""Service errors to HTTP replies: one shape, `{"detail": {"error", "message"}}`, no tracebacks."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mv.generation_jobs import GenerationFailure
from services.generation.base import (
    GenerationBusyError,
    GenerationCanceledError,
    GenerationError,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorNotOfferedError,
    GeneratorUnavailableError,
    ProviderError,
)
from services.generation.generators.worker import WorkerBusyError
from services.generation.records import GenerationNotFoundError, StoredGenerationFailedError
from services.generation.service import GenerationFinishedError, WebhooksDisabledError
from services.idempotency import IdempotencyKeyError, IdempotencyKeyInUseError
from services.image_files import UnsupportedImageError
from services.jobs import JobExistsError
from services.storage.errors import (
    ConcurrentUpdateError,
    InvalidKeyError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
)

logger = logging.getLogger(__name__)

# (error class, HTTP status, error name); the first match wins, so subclasses come first.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (WorkerBusyError, 429, "WorkerBusy"),
    (GenerationBusyError, 429, "QueueFull"),
    (GenerationNotFoundError, 404, "NotFound"),
    (GenerationFinishedError, 409, "AlreadyFinished"),
    (GenerationCanceledError, 409, "Canceled"),
    (GeneratorUnavailableError, 503, "GeneratorUnavailable"),
    (GeneratorFailedError, 503, "GeneratorFailed"),
    (ProviderError, 502, "ProviderError"),
    (GenerationTimeoutError, 504, "GenerationTimeout"),
    (GenerationError, 502, "GenerationFailed"),
    (JobExistsError, 409, "JobExists"),
    (IdempotencyKeyInUseError, 409, "IdempotencyKeyInUse"),
    (PreconditionFailedError, 409, "ConcurrentUpdate"),
    (ConcurrentUpdateError, 503, "ConcurrentUpdate"),
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


# Errors about one request field: 422 in FastAPI's own validation shape, naming the field.
_FIELD_ERRORS: list[tuple[type[Exception], tuple[str, str]]] = [
    (IdempotencyKeyError, ("header", "Idempotency-Key")),
    (WebhooksDisabledError, ("body", "webhook_url")),
    (GeneratorNotOfferedError, ("body", "backend")),
]


def classify_error(exc: BaseException) -> GenerationFailure:
    """The status, name and message a service error is answered with (stored for async runs)."""
    if isinstance(exc, StoredGenerationFailedError):
        return exc.failure
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            return GenerationFailure(error=name, message=str(exc), status_code=status)
    logger.error("unexpected error", exc_info=exc)
    return GenerationFailure(
        error="InternalError", message="internal error; see the server log", status_code=500
    )


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    failure = classify_error(exc)
    headers = {}
    if isinstance(exc, GenerationBusyError):
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, ConcurrentUpdateError | IdempotencyKeyInUseError):
        headers["Retry-After"] = "1"
    if failure.status_code >= 500:
        logger.warning(
            "%s %s: %s: %s", request.method, request.url.path, failure.error, failure.message
        )
    return error_response(failure.status_code, failure.error, failure.message, **headers)


async def _field_error(request: Request, exc: Exception) -> JSONResponse:
    loc = next(loc for kind, loc in _FIELD_ERRORS if isinstance(exc, kind))
    detail = [{"type": "value_error", "loc": list(loc), "msg": str(exc)}]
    return JSONResponse({"detail": detail}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI and Starlette answer 400 for a body they cannot decode (JSON that is not
        # UTF-8, a broken multipart form); like any other malformed body, that is a 422
        # naming the body. The backend itself never raises 400.
        detail = [{"type": "body_invalid", "loc": ["body"], "msg": str(exc.detail)}]
        return JSONResponse({"detail": detail}, status_code=422)
    return await http_exception_handler(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Map service errors to statuses; anything unexpected to a bare 500."""
    for kind, _ in _FIELD_ERRORS:
        app.add_exception_handler(kind, _field_error)
    app.add_exception_handler(StoredGenerationFailedError, _service_error)
    for kind, _, _ in _STATUS:
        app.add_exception_handler(kind, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

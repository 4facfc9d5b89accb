"""Errors to HTTP replies, all in the one shape of `routers.errors.shape`, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from echo import MAX_ECHOED_CHARS
from mv.errors import ErrorName
from mv.generation_jobs import GenerationFailure
from mv.ids import InvalidKeyError
from routers.errors.shape import (
    FieldProblem,
    error_body,
    error_response,
    validation_response,
)
from services.asset_persistence import UnsupportedImageError
from services.generation.base import (
    GenerationBusyError,
    GenerationCanceledError,
    GenerationError,
    GenerationTimeoutError,
    GeneratorFailedError,
    GeneratorNotOfferedError,
    GeneratorUnavailableError,
    ProviderError,
    ReferencesNotSupportedError,
)
from services.generation.generators.worker import WorkerBusyError
from services.generation.records import GenerationNotFoundError, StoredGenerationFailedError
from services.generation.service import GenerationFinishedError, WebhooksDisabledError
from services.idempotency import IdempotencyKeyError, IdempotencyKeyInUseError
from services.jobs import JobExistsError
from services.owner_index import InvalidCursorError
from services.storage import (
    ConcurrentUpdateError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
)
from services.webhooks import WebhookRefusedError

logger = logging.getLogger(__name__)

# (error class, HTTP status, error name); the first match wins, so subclasses come first.
_STATUS: list[tuple[type[Exception], int, ErrorName]] = [
    (WorkerBusyError, 429, "WorkerBusy"),
    (GenerationBusyError, 429, "QueueFull"),
    (GenerationNotFoundError, 404, "NotFound"),
    (GenerationFinishedError, 409, "AlreadyFinished"),
    (GenerationCanceledError, 409, "Canceled"),
    (GeneratorUnavailableError, 503, "GeneratorUnavailable"),
    (GeneratorFailedError, 503, "GeneratorFailed"),
    (ProviderError, 502, "ProviderError"),
    (GenerationTimeoutError, 504, "GenerationTimeout"),
    # Raised before queueing it is a 422 naming the field (_FIELD_ERRORS); found while an
    # asynchronous generation runs (a model that loaded since), its stored failure says so.
    (ReferencesNotSupportedError, 422, "ReferencesNotSupported"),
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


# Service errors about one request field: a 422 naming it.
_FIELD_ERRORS: list[tuple[type[Exception], tuple[str, str]]] = [
    (IdempotencyKeyError, ("header", "Idempotency-Key")),
    (WebhooksDisabledError, ("body", "webhook_url")),
    (WebhookRefusedError, ("body", "webhook_url")),
    (GeneratorNotOfferedError, ("body", "backend")),
    (ReferencesNotSupportedError, ("body", "reference_image_ids")),
    (InvalidCursorError, ("query", "cursor")),
]


class FieldError(Exception):
    """A 422 about one request field that a route checks itself (a multipart form field)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _field_loc(exc: Exception) -> tuple[str, ...]:
    if isinstance(exc, FieldError):
        return exc.loc
    return next(loc for kind, loc in _FIELD_ERRORS if isinstance(exc, kind))


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
    return validation_response([FieldProblem(loc=list(_field_loc(exc)), message=str(exc))])


def _problem(error: Any) -> FieldProblem:
    """One of FastAPI's validation errors, without its `input` (never echoed back)."""
    loc = list(error.get("loc", ("body",)))
    if error.get("type") == "json_invalid":
        loc = ["body"]  # FastAPI points at a character offset; the body as a whole is bad
    return FieldProblem(loc=loc, message=str(error.get("msg", "invalid")))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [_problem(error) for error in exc.errors()]
    return validation_response(problems or [FieldProblem(loc=["body"], message="invalid")])


# Starlette's own errors by status; the API raises no other (a 400 becomes a 422).
_HTTP_ERROR_NAMES: dict[int, ErrorName] = {
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "TooLarge",
    416: "RangeNotSatisfiable",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method, undecodable body) in the one shape."""
    assert isinstance(exc, StarletteHTTPException)
    status, headers = exc.status_code, dict(exc.headers or {})
    if status == 400:
        # FastAPI and Starlette answer 400 for a body they cannot decode (JSON that is not
        # UTF-8, a broken multipart form); like any other malformed body, that is a 422
        # naming the body. The backend itself never raises 400.
        return validation_response([FieldProblem(loc=["body"], message=str(exc.detail))])
    if isinstance(exc.detail, dict) and "error" in exc.detail:
        body = {"detail": exc.detail}
    else:
        path = request.url.path[:MAX_ECHOED_CHARS]
        if status == 404:
            message = f"no route {path}"
        elif status == 405:
            message = f"{request.method} is not allowed on {path}; allowed: {headers.get('Allow')}"
        else:
            message = str(exc.detail)[:MAX_ECHOED_CHARS]
        body = error_body(_HTTP_ERROR_NAMES.get(status, "HttpError"), message)
    return JSONResponse(body, status_code=status, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Map service errors to statuses, validation to 422s naming fields, the rest to a 500."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StoredGenerationFailedError, _service_error)
    for kind, _, _ in _STATUS:
        app.add_exception_handler(kind, _service_error)
    # After the statuses: an error listed in both is answered as the field it is about.
    app.add_exception_handler(FieldError, _field_error)
    for kind, _ in _FIELD_ERRORS:
        app.add_exception_handler(kind, _field_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

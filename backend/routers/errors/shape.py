"""The one error shape every 4xx/5xx reply has, as models (for OpenAPI) and as a builder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mv.errors import ServiceErrorName


class FieldProblem(BaseModel):
    """One invalid field of a request."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int] = Field(description='where the field is: ["body", "num_images"]')
    message: str


class ServiceErrorDetail(BaseModel):
    """What went wrong: a stable name to branch on and one sentence for people."""

    model_config = ConfigDict(extra="forbid")

    error: ServiceErrorName = Field(description="stable error name, e.g. NotFound, QueueFull")
    message: str


class ValidationErrorDetail(BaseModel):
    """A request the server refused as invalid: which fields, and why."""

    model_config = ConfigDict(extra="forbid")

    error: Literal["ValidationError"]
    message: str = Field(description="names the first invalid field")
    fields: list[FieldProblem]


# `error` tells the two apart: only a ValidationError has `fields`.
ErrorDetail = Annotated[ValidationErrorDetail | ServiceErrorDetail, Field(discriminator="error")]


class ErrorReply(BaseModel):
    """The body of every 4xx/5xx reply."""

    model_config = ConfigDict(extra="forbid")

    detail: ErrorDetail


def error_body(error: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error reply; `error` is one of mv.errors.ErrorName (the API's) or a
    name of the worker tier's own internal API."""
    return {"detail": {"error": error, "message": message, **extra}}


def error_response(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    """The JSON error reply every endpoint uses."""
    return JSONResponse(error_body(error, message), status_code=status, headers=headers)


def validation_response(problems: Sequence[FieldProblem]) -> JSONResponse:
    """A 422 naming every invalid field; the message names the first."""
    first = problems[0]
    where = ".".join(str(part) for part in first.loc)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return JSONResponse(
        error_body(
            "ValidationError",
            f"{where}: {first.message}{more}",
            fields=[problem.model_dump() for problem in problems],
        ),
        status_code=422,
    )

"""The one error shape every 4xx/5xx reply has, as models (for OpenAPI) and as a builder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class FieldProblem(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description='where the field is: ["body", "num_images"]')
    message: str


class ErrorDetail(BaseModel):
    """What went wrong: a stable name to branch on and one sentence for people."""

    model_config = ConfigDict(extra="allow")  # some errors add context (e.g. `fields`)

    error: str = Field(description="stable error name, e.g. NotFound, QueueFull")
    message: str


class ErrorReply(BaseModel):
    """The body of every 4xx/5xx reply."""

    detail: ErrorDetail


class ValidationErrorDetail(ErrorDetail):
    """A 422: which fields are invalid and why."""

    fields: list[FieldProblem]


class ValidationErrorReply(BaseModel):
    """The body of a 422 reply."""

    detail: ValidationErrorDetail


def error_body(error: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of an error reply."""
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

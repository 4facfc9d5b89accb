"""The OpenAPI document declares the one error shape on every 4xx/5xx response."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from routers.errors.shape import ErrorReply, ValidationErrorReply

_REF = "#/components/schemas/{model}"
# FastAPI's own 422 schemas, which the app never sends.
_REPLACED = ("HTTPValidationError", "ValidationError")


def _json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}


def _add_schemas(components: dict[str, Any], *models: type[BaseModel]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema


def declare_error_shape(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every error response's body declared as ErrorReply (422: with fields)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _REPLACED:
        components.pop(name, None)
    _add_schemas(components, ErrorReply, ValidationErrorReply)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[0] in "45":
                    model = ValidationErrorReply if str(status) == "422" else ErrorReply
                    response["content"] = _json_content(model)
    return schema


def install_error_schema(app: FastAPI) -> None:
    """Make `app.openapi()` declare the error shape (built once, like FastAPI's own)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = declare_error_shape(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""The OpenAPI document as generated clients need it, whatever the server's configuration.

FastAPI builds it from the routes; `finish` then adds what every operation shares: the error
shape on every 4xx/5xx, the statuses middleware sends (401, 403, 413, 500), the security
schemes, and the headers every reply carries.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel

from mv.generation_jobs import ProgressEvent, QueuedEvent
from routers.errors import ErrorReply
from routers.openapi.responses import RETRY_AFTER, header

_REF = "#/components/schemas/{model}"
# Models that event streams send as `data`, which no JSON reply names.
_EVENT_MODELS: tuple[type[BaseModel], ...] = (QueuedEvent, ProgressEvent)
# FastAPI's own 422 schemas, which the app never sends.
_REPLACED = ("HTTPValidationError", "ValidationError")
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorReply")}}}
_REQUEST_ID = {"$ref": "#/components/headers/X-Request-ID"}

SECURITY_SCHEMES: dict[str, Any] = {
    "ApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "an owner's key (API_KEYS) or an operator's (ADMIN_API_KEYS)",
    },
    "BearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "a JWT from the identity provider AUTH_JWKS_URL names (its `sub` is "
        "the owner); accepted when the server has AUTH_JWKS_URL set",
    },
    "SignedUrl": {
        "type": "apiKey",
        "in": "query",
        "name": "signature",
        "description": "a URL the server signed (`expires` and `signature`, as the API's own "
        "image URLs carry them): a GET of exactly that URL needs no X-API-Key",
    },
}
HEADERS: dict[str, Any] = {
    "X-Request-ID": header(
        "the request's id in the server's logs (the client's own X-Request-ID when well-formed)",
        required=True,
    ),
}
TAGS: list[dict[str, Any]] = [
    {
        "name": "character references",
        "description": "Generate candidate images of a character (from a description, or from "
        "stored references), upload your own, and serve them: bytes, thumbnails, metadata.",
    },
    {
        "name": "asynchronous generation",
        "description": "The same generation as a job: 202 at once, then poll or get a webhook; "
        "cancel while it runs.",
    },
    {
        "name": "jobs",
        "description": "Video jobs: create them, attach character references, read their assets.",
    },
    {"name": "system", "description": "Liveness, readiness, version and Prometheus metrics."},
]


def operation_id(route: APIRoute) -> str:
    """A short, stable operation id: the route function's name in camelCase."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with the shared parts every operation declares."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _REPLACED:
        schemas.pop(name, None)
    error_schema = ErrorReply.model_json_schema(ref_template=_REF)
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorReply"] = error_schema
    for model in _EVENT_MODELS:
        schemas[model.__name__] = model.model_json_schema(ref_template=_REF, mode="serialization")
    components["securitySchemes"] = SECURITY_SCHEMES
    components["headers"] = HEADERS
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            _finish_operation(path, operation)
    return document


def _finish_operation(path: str, operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        _not_nullable(parameter)
    responses: dict[str, Any] = operation["responses"]
    signed = any(param["name"] == "signature" for param in operation.get("parameters", []))
    if path.startswith("/api/"):
        operation["security"] = [
            {"ApiKey": []},
            {"BearerAuth": []},
            *([{"SignedUrl": []}] if signed else []),
        ]
        responses.setdefault(
            "401",
            {
                "description": "no valid X-API-Key or bearer token (when the server asks for "
                "one): Unauthorized, or InvalidToken saying what is wrong with the token",
                "headers": {
                    "WWW-Authenticate": header(
                        "the schemes it takes: ApiKey, Bearer", required=True
                    )
                },
            },
        )
        responses.setdefault(
            "503",
            {
                "description": "storage unreachable, or the identity provider's keys could not be "
                "fetched to check a bearer token"
            },
        )
        if signed:
            responses.setdefault(
                "403", {"description": "the signed URL was changed, has expired, or is another's"}
            )
    else:
        operation["security"] = []  # public
    if "requestBody" in operation:
        responses.setdefault("413", {"description": "the request body is too large"})
    responses.setdefault("500", {"description": "internal error; the server log has the details"})
    for status, response in responses.items():
        for media in response.get("content", {}).values():
            # An OpenAPI 3.2 keyword FastAPI adds to event streams; this is a 3.1 document,
            # and the route declares its events itself.
            media.pop("itemSchema", None)
        headers = response.setdefault("headers", {})
        if status[0] in "45" and _is_error_shaped(response):
            response["content"] = _ERROR_CONTENT
            if status == "429":
                headers["Retry-After"] = RETRY_AFTER
            elif status in ("409", "503"):  # a conflict or outage that may pass
                headers["Retry-After"] = {**RETRY_AFTER, "required": False}
        headers["X-Request-ID"] = _REQUEST_ID
    operation["responses"] = dict(sorted(responses.items()))


def _is_error_shaped(response: dict[str, Any]) -> bool:
    """Whether a 4xx/5xx reply is in the error shape: the route declared no body of its own
    (FastAPI's default 422 body is replaced)."""
    content = response.get("content")
    if not content:
        return True
    schema = content.get("application/json", {}).get("schema", {})
    return schema.get("$ref", "").rpartition("/")[2] in _REPLACED


def _not_nullable(parameter: dict[str, Any]) -> None:
    """An optional parameter is left out, never sent as null: `T | None` in the route's
    signature is declared as plain `T`."""
    schema = parameter.get("schema", {})
    variants = schema.get("anyOf", [])
    if parameter.get("required") or len(variants) != 2 or {"type": "null"} not in variants:
        return
    (kept,) = [variant for variant in variants if variant != {"type": "null"}]
    schema.pop("anyOf")
    parameter["schema"] = {**kept, **schema}

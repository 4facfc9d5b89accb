"""The OpenAPI document: one for every configuration, that generated clients can use.

`responses` holds what routes declare beyond their JSON models (binary bodies, headers,
parameters read by middleware); `document` finishes what every operation shares. `install`
serves it, with `servers` set to PUBLIC_BASE_URL or the request's own base URL.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from routers.openapi.document import TAGS, finish, operation_id

# Keyword arguments of the FastAPI app that shape its document.
DOCUMENT_OPTIONS: dict[str, Any] = {
    "openapi_tags": TAGS,
    "license_info": {"name": "Proprietary", "identifier": "LicenseRef-Proprietary"},
    "contact": {"name": "Music-video backend team"},
    "generate_unique_id_function": operation_id,
}


def install(app: FastAPI, public_base_url: str | None) -> None:
    """Serve the finished document at the app's openapi_url; `app.openapi()` returns it
    without `servers` (they depend on the request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def serve_document(request: Request) -> JSONResponse:
        base = public_base_url or str(request.base_url)
        return JSONResponse({**openapi(), "servers": [{"url": base.rstrip("/")}]})

    path = app.openapi_url
    assert path is not None
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", "") != path]
    app.add_route(path, serve_document, include_in_schema=False)

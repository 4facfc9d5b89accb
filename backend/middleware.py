"""ASGI middleware: request ids, access logs and HTTP metrics; who a request is on /api."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mv.principals import EVERYONE, PRINCIPAL
from observability import bind, request_id_var
from routers.errors.shape import error_body, error_response
from services.auth import AuthenticationError, Authenticator
from services.metrics import Metrics

logger = logging.getLogger("mv.access")
REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_INTERNAL_ERROR = json.dumps(
    error_body("InternalError", "internal error; see the server log")
).encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives each request an id (the client's X-Request-ID when well-formed), returns it,
    logs one line per request and records its latency by route.

    An exception no handler turned into a reply becomes a bare 500 here, so that it too
    carries the request id and is counted.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = _header(scope, b"x-request-id")
        request_id = (
            offered if offered and _CLIENT_REQUEST_ID.fullmatch(offered) else os.urandom(16).hex()
        )
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if response_started:
                raise
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send_with_id({"type": "http.response.body", "body": _INTERNAL_ERROR})
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.observe_request(method, route, status, elapsed)
            if logger.isEnabledFor(logging.INFO):  # the line's fields cost more than the check
                logger.info(
                    "%s %s %d",
                    method,
                    scope["path"],
                    status,
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)


class AuthMiddleware:
    """On /api routes, finds who the request is (`authenticator`) before the body is read,
    and puts that Principal in the request's state (routes get it from routers.deps); a
    request that is not let in is answered here, in the error shape, with its challenge."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, prefix: str = "/api/") -> None:
        self.app = app
        self.authenticator = authenticator
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if not self.authenticator.enabled:  # the one principal: nothing to read
            scope.setdefault("state", {})[PRINCIPAL] = EVERYONE
            await self.app(scope, receive, send)
            return
        try:
            principal = await self.authenticator.principal(
                scope["method"],
                scope["path"],
                scope["query_string"].decode("latin-1"),
                _header(scope, b"x-api-key"),
                _header(scope, b"authorization"),
            )
        except AuthenticationError as refused:
            headers = (
                []
                if refused.challenge is None
                else [(b"www-authenticate", refused.challenge.encode())]
            )
            await _send_json(send, refused.status, error_body(refused.error, str(refused)), headers)
            return
        scope.setdefault("state", {})[PRINCIPAL] = principal
        bind(owner=principal.owner)
        await self.app(scope, receive, send)


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, before they are buffered.

    A declared Content-Length over the limit is refused without reading anything; a body that
    streams in without one is counted, and reading stops at the limit. Paths in
    `own_limit_paths` enforce a limit of their own (the image upload) and are left alone.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, own_limit_paths: set[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.own_limit_paths = own_limit_paths

    def _too_large(self) -> dict[str, Any]:
        limit_kb = self.max_bytes // 1024
        return error_body("TooLarge", f"the body is over {limit_kb} KB")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.own_limit_paths:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, self._too_large())
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised inside the app's body read, so the app answers it like any error.
                raise HTTPException(413, self._too_large()["detail"])
            return message

        await self.app(scope, counting_receive, send)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered in the API's error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight reply; a refusal is a JSON 400 naming what was not allowed."""
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = error_response(
            response.status_code, "CorsRefused", bytes(response.body).decode() or "refused"
        )
        for name, value in response.headers.items():
            if name.lower().startswith("access-control-") or name.lower() == "vary":
                refused.headers[name] = value
        return refused

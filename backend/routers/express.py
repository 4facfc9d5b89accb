"""Express routes: the hot image GETs answered without FastAPI's per-request routing and
dependency solving, which cost a 307 most of its time (see the serving rows of `make bench`).

An express route stands in front of the documented route it speeds up and takes only the
requests whose parameters its pattern has already checked: a canonical UUID, a known size,
flags absent or exactly `true` / `false`. It answers them by calling that route's own endpoint
with the same services. Any other request (a malformed id, `redirect=yes`, another method) is
not its business and falls through to the documented route, which validates and answers as it
always did. Errors raised by the endpoint reach the app's error handlers, as any route's do.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request, Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

# The canonical form, the one our URLs carry; other spellings take the documented route.
UUID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_FLAG_VALUES = {"true": True, "false": False}
_FLAGS_KEY = "mv.express_flags"

Answer = Callable[..., Awaitable[Response]]
Service = TypeVar("Service")


class ExpressRoute(BaseRoute):
    """GET and HEAD of `pattern` (named groups: the path parameters), answered by `answer`.

    `route_path` is the documented route's template: metrics and logs name that route.
    `answer(request, **path_parameters, **flags)` gets each flag as a bool (absent: False).
    """

    def __init__(
        self, route_path: str, pattern: str, answer: Answer, flags: Sequence[str] = ()
    ) -> None:
        self.path = route_path
        self._regex = re.compile(pattern)
        self._answer = answer
        self._flags = tuple(flags)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """FULL for a GET or HEAD it can answer; NONE for anything else (never PARTIAL)."""
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return Match.NONE, {}
        found = self._regex.fullmatch(_route_path(scope))
        if found is None:
            return Match.NONE, {}
        flags = self._read_flags(scope["query_string"])
        if flags is None:
            return Match.NONE, {}
        return Match.FULL, {"route": self, "path_params": found.groupdict(), _FLAGS_KEY: flags}

    def _read_flags(self, query_string: bytes) -> dict[str, bool] | None:
        """Each flag's value (the last one given, as Starlette reads it), None when one is not
        plainly `true` or `false`."""
        flags = dict.fromkeys(self._flags, False)
        if not query_string or not self._flags:
            return flags
        text = query_string.decode("latin-1")
        if "%" in text or "+" in text:
            given = dict(parse_qsl(text, keep_blank_values=True))
        else:  # nothing to decode: split it as parse_qsl would, at a fraction of its cost
            given = {name: value for name, _, value in map(_split_pair, text.split("&")) if name}
        for name in self._flags:
            if name in given:
                value = _FLAG_VALUES.get(given[name])
                if value is None:
                    return None
                flags[name] = value
        return flags

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer with the endpoint's reply."""
        request = Request(scope, receive)
        response = await self._answer(request, **scope["path_params"], **scope[_FLAGS_KEY])
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        """Express routes have no name of their own: URLs are built from the documented ones."""
        raise NoMatchFound(name, path_params)


async def service(request: Request, getter: Callable[[Request], Awaitable[Service]]) -> Service:
    """What the dependency `getter` gives the documented route (overrides included)."""
    provider = request.app.dependency_overrides.get(getter, getter)
    return await provider(request)


def _split_pair(pair: str) -> tuple[str, str, str]:
    return pair.partition("=")


def _route_path(scope: Scope) -> str:
    """The path below the app's root path, as routes match it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root) :]
    return path

"""The bare baselines for the serving benchmark: a Starlette app that only returns a
FileResponse, and one that only returns a 307. Configured through environment variables."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.responses import FileResponse, RedirectResponse
from starlette.routing import Route


async def _file(_request) -> FileResponse:
    return FileResponse(os.environ["BARE_FILE"], media_type="image/png")


async def _redirect(_request) -> RedirectResponse:
    return RedirectResponse(os.environ["BARE_REDIRECT_URL"], status_code=307)


file_app = Starlette(routes=[Route("/image", _file)])
redirect_app = Starlette(routes=[Route("/image", _redirect)])

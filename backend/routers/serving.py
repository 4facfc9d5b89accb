"""Replies that serve a stored file: its bytes (with validators), a presigned URL, or a 307."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable

from fastapi import Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from routers.errors import error_response
from services.asset_persistence import CloudImage, LocalImageFile
from services.storage import ObjectNotFoundError

IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
REVALIDATE_CACHE = "no-cache"  # job assets may be replaced by a later persist
# Files are read in chunks of this size, one worker-thread hop each; a file no larger is read
# whole in the hop that opens it (Starlette's default, 64 KB, costs a 700 KB image 12 hops).
CHUNK_BYTES = 1024 * 1024


async def stored_file_response(
    request: Request,
    located: CloudImage | LocalImageFile,
    *,
    redirect: bool,
    cloud_reply: Callable[[CloudImage], BaseModel],
    cache_control: str = IMMUTABLE_CACHE,
) -> Response:
    """Bytes for a local file; for a cloud copy a 307 (`redirect`) or `cloud_reply` as JSON."""
    if isinstance(located, LocalImageFile):
        return await file_response(request, located, cache_control)
    if redirect:
        # The presigned URL is already encoded: it needs no quoting, which RedirectResponse does.
        return Response(status_code=307, headers={"Location": located.url.url})
    return JSONResponse(cloud_reply(located).model_dump(mode="json"))


async def file_response(request: Request, image: LocalImageFile, cache_control: str) -> Response:
    """The file with validators and caching headers; 304 when the client's copy is current."""
    headers = {"Cache-Control": cache_control, "X-Content-Type-Options": "nosniff"}
    if image.etag is not None:
        headers["ETag"] = image.etag
        if image.etag in _entity_tags(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
    # A whole GET of a small file is read at once; ranges and HEAD take Starlette's path.
    range_header = request.headers.get("range")
    read_whole = request.method == "GET" and range_header is None
    try:
        descriptor, stat, data = await asyncio.to_thread(_open, image.path, read_whole)
    except FileNotFoundError:  # deleted since it was located
        raise ObjectNotFoundError(image.key, "not found (deleted)") from None
    if data is not None:
        return ReadFileResponse(
            image.path, data, stat, media_type=image.content_type, headers=headers
        )
    assert descriptor is not None
    usable_range = range_header is not None and _range_is_valid(range_header, stat.st_size)
    if usable_range is None:
        os.close(descriptor)
        return error_response(
            416,
            "RangeNotSatisfiable",
            f"the range starts beyond the file's {stat.st_size} bytes",
            **{"Content-Range": f"bytes */{stat.st_size}"},
        )
    return OpenedFileResponse(
        descriptor,
        stat,
        media_type=image.content_type,
        headers=headers,
        ignore_range=not usable_range,
    )


def _range_is_valid(header: str, size: int) -> bool | None:
    """Whether a Range header can be served (Starlette's own parser, the one that serves it);
    None when it asks only for bytes past the end (a 416)."""
    try:
        FileResponse._parse_range_header(header, size)
    except RangeNotSatisfiable:
        return None
    except MalformedRangeHeader:
        return False  # RFC 9110 14.2: a Range the server cannot parse is ignored: a 200
    return True


def _open(
    path: os.PathLike[str], read_whole: bool
) -> tuple[int | None, os.stat_result, bytes | None]:
    """The open descriptor and its stat; with `read_whole`, a file of at most CHUNK_BYTES is
    read and closed instead, and returned as bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.fstat(descriptor)
        if read_whole and stat.st_size <= CHUNK_BYTES:
            data = os.read(descriptor, stat.st_size + 1)  # +1: a file grown since fstat shows
            if len(data) == stat.st_size:
                os.close(descriptor)
                return None, stat, data
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, stat, None


class ReadFileResponse(FileResponse):
    """A small file already read into memory, sent in one message, with the headers (length,
    type, validators, Accept-Ranges) a FileResponse of it would send."""

    def __init__(
        self,
        path: os.PathLike[str],
        data: bytes,
        stat: os.stat_result,
        *,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(path, stat_result=stat, media_type=media_type, headers=headers)
        self._data = data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self._data})


class OpenedFileResponse(FileResponse):
    """A FileResponse over a file opened before the reply starts, read in CHUNK_BYTES chunks.

    Files are replaced and deleted by rename and unlink, so an open descriptor keeps the
    version it opened: a delete racing the reply leaves the reader a whole file (or, before
    the open, a 404), never half of one or a 500.
    """

    chunk_size = CHUNK_BYTES

    def __init__(
        self,
        descriptor: int,
        stat: os.stat_result,
        *,
        media_type: str,
        headers: dict[str, str],
        ignore_range: bool = False,
    ) -> None:
        # The descriptor's own path: every read Starlette does (ranges included) opens the
        # same file, even after an unlink.
        super().__init__(
            f"/proc/self/fd/{descriptor}", stat_result=stat, media_type=media_type, headers=headers
        )
        self._close = weakref.finalize(self, os.close, descriptor)
        self._ignore_range = ignore_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._ignore_range:
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != b"range"]}
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


def _entity_tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}

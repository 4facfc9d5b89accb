"""Replies that serve a stored file: its bytes (with validators), a presigned URL, or a 307."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel

from services.image_delivery import CloudImage, LocalImageFile

IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
REVALIDATE_CACHE = "no-cache"  # job assets may be replaced by a later persist


def stored_file_response(
    request: Request,
    located: CloudImage | LocalImageFile,
    *,
    redirect: bool,
    cloud_reply: Callable[[CloudImage], BaseModel],
    cache_control: str = IMMUTABLE_CACHE,
) -> Response:
    """Bytes for a local file; for a cloud copy a 307 (`redirect`) or `cloud_reply` as JSON."""
    if isinstance(located, LocalImageFile):
        return file_response(request, located, cache_control)
    if redirect:
        return RedirectResponse(located.url.url, status_code=307)
    return JSONResponse(cloud_reply(located).model_dump(mode="json"))


def file_response(request: Request, image: LocalImageFile, cache_control: str) -> Response:
    """The file with validators and caching headers; 304 when the client's copy is current."""
    headers = {"Cache-Control": cache_control, "X-Content-Type-Options": "nosniff"}
    if image.etag is not None:
        headers["ETag"] = image.etag
        if image.etag in _entity_tags(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
    return FileResponse(image.path, media_type=image.content_type, headers=headers)


def _entity_tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}

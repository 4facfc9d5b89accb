"""Request bodies with a hard size cap, enforced while they arrive."""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.types import Message, Receive

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Every other body is JSON, and small: a job's metadata is at most 16 KB.
MAX_JSON_BODY_BYTES = 1024 * 1024
UPLOAD_PATH = "/api/mv/upload_character_reference"
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


def too_large(limit: int) -> HTTPException:
    """The 413 reply for a body over `limit` bytes."""
    return HTTPException(
        413,
        {"error": "TooLarge", "message": f"the file is larger than {limit // (1024 * 1024)} MB"},
    )


def capped_request(request: Request, limit: int) -> Request:
    """`request`, refused with 413 as soon as its body passes `limit` bytes.

    A declared Content-Length over the limit is refused before any of the body is read; a
    body without one is counted as it streams in.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit - MULTIPART_OVERHEAD)
    received = 0
    receive = request.receive

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large(limit - MULTIPART_OVERHEAD)
        return message

    capped_receive: Receive = counting_receive
    return Request(request.scope, capped_receive)

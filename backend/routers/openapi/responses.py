"""What routes declare beyond their JSON model: binary bodies, headers, redirects, and the
query and header parameters that only middleware or the file reply read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Query
from pydantic import BaseModel

Responses = dict[int | str, dict[str, Any]]

BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


def header(
    description: str, *, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A response header's declaration."""
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


ETAG = header("the file's entity tag, for If-None-Match")
LOCATION = header("where the created or moved resource is", required=True)
RETRY_AFTER = header(
    "seconds to wait before trying again", required=True, schema={"type": "integer", "minimum": 0}
)
GENERATION_ID = header(
    "the generation's id (the same for a replay of an Idempotency-Key)",
    required=True,
    schema={"type": "string", "format": "uuid"},
)
_FILE_HEADERS = {
    "ETag": ETAG,
    "Cache-Control": header("how long the bytes may be cached"),
    "Content-Length": header("size in bytes", schema={"type": "integer", "minimum": 0}),
    "Accept-Ranges": header("bytes: Range requests are served"),
}


def served_file(
    media_types: tuple[str, ...],
    *,
    cloud_model: type[BaseModel] | None,
    what: str,
) -> Responses:
    """The replies of a route that serves a stored file: its bytes (200, 206, 304) in local
    serving; in cloud serving its presigned URL as `cloud_model` (JSON) or a 307 to it."""
    content = {media_type: BINARY for media_type in media_types}
    ok: dict[str, Any] = {
        "description": f"{what}: the bytes; in cloud serving, "
        + ("its presigned URL (JSON)" if cloud_model else "a 307 instead"),
        "content": content,
        "headers": _FILE_HEADERS,
    }
    if cloud_model is not None:
        ok["model"] = cloud_model  # FastAPI declares it as application/json
    return {
        200: ok,
        206: {
            "description": "the requested range of the bytes (several ranges: multipart)",
            "content": {**content, "multipart/byteranges": BINARY},
            "headers": {
                # A multipart reply (several ranges) names each part's range in the part.
                "Content-Range": header("one range: which bytes, of how many"),
                "ETag": ETAG,
            },
        },
        304: {
            "description": "not modified: the If-None-Match entity tag is current",
            "headers": {"ETag": {**ETAG, "required": True}},
        },
        307: {
            "description": "cloud serving: redirect to the presigned URL",
            "headers": {"Location": LOCATION},
        },
        404: {"description": f"no such {what}"},
        416: {"description": "the Range starts past the end of the file"},
        503: {"description": "storage unreachable and no local copy"},
    }


def event_stream(events: dict[str, str], what: str) -> dict[str, Any]:
    """The 200 of a Server-Sent Events route: `events` maps each event name to the component
    schema of its `data` (JSON on one line)."""
    names = ", ".join(f"`{name}` ({model})" for name, model in events.items())
    return {
        "description": f"{what}: a text/event-stream of events, each with an `id`, an `event` "
        f"name and one `data` line of JSON: {names}; comment lines (`:`) are heartbeats",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    # What each event's `data` line holds, for clients that decode it.
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": f"#/components/schemas/{model}"}
                            for model in dict.fromkeys(events.values())
                        ]
                    },
                },
            }
        },
    }


# Declared for the document; ApiKeyMiddleware checks them before any route runs.
async def signed_url_parameters(
    expires: Annotated[
        int | None,
        Query(ge=0, description="signed URLs: the Unix time the signature expires"),
    ] = None,
    signature: Annotated[
        str | None,
        Query(description="signed URLs: the signature of the path and every query parameter"),
    ] = None,
) -> None:
    """The query parameters of a signed URL: a GET that needs no X-API-Key."""


# Declared for the document; the file reply reads them.
async def conditional_range_headers(
    if_none_match: Annotated[
        str | None,
        Header(alias="If-None-Match", description="an ETag you hold: 304 when it is current"),
    ] = None,
    range_: Annotated[
        str | None,
        Header(alias="Range", description="bytes=START-END: 206 with those bytes"),
    ] = None,
) -> None:
    """The request headers of a conditional or partial GET."""

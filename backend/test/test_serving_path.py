"""The lean serving path: small files read in the hop that opens them, and the express routes
in front of the image GETs, which answer exactly as the documented routes do."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from starlette.responses import FileResponse
from starlette.routing import Match

from conftest import ApiHarness, assert_error_shape, image_bytes
from routers import mv
from routers.express import ExpressRoute
from routers.serving import CHUNK_BYTES, OpenedFileResponse, ReadFileResponse, file_response
from services.asset_persistence import LocalImageFile

API_KEY = "serving-path-test-key-0123456789"
# Headers that differ between two replies to the same request whatever served them.
PER_REPLY = {"x-request-id", "date"}


def _file_app(path: Path, data: bytes, replies: list[Response]) -> FastAPI:
    """An app whose one route writes `data` to `path`, serves it, and deletes it before the
    first byte is sent."""
    app = FastAPI()

    @app.api_route("/file", methods=["GET", "HEAD"])
    async def serve_then_delete(request: Request) -> Response:
        path.write_bytes(data)
        located = LocalImageFile("k", path, "image/png", '"v1"')
        response = await file_response(request, located, "no-cache")
        path.unlink()
        replies.append(response)
        return response

    return app


@pytest.mark.parametrize(
    "size", [0, 1000, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 7], ids=lambda s: f"{s}B"
)
def test_a_file_of_any_size_is_served_whole_by_range_and_by_head(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "image.png"
    replies: list[Response] = []
    with TestClient(_file_app(path, data, replies)) as client:
        whole = client.get("/file")
        assert whole.status_code == 200
        assert whole.content == data
        assert whole.headers["content-length"] == str(size)
        assert whole.headers["etag"] == '"v1"'
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["last-modified"]
        # Read in the hop that opened it when it fits in one chunk; streamed otherwise.
        expected = ReadFileResponse if size <= CHUNK_BYTES else OpenedFileResponse
        assert type(replies[-1]) is expected

        head = client.head("/file")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(size)
        assert type(replies[-1]) is OpenedFileResponse  # HEAD reads nothing

        if size > 20:
            ranged = client.get("/file", headers={"Range": f"bytes=10-{size - 1}"})
            assert ranged.status_code == 206
            assert ranged.content == data[10:]
            assert ranged.headers["content-range"] == f"bytes 10-{size - 1}/{size}"
            assert type(replies[-1]) is OpenedFileResponse


@pytest.mark.parametrize("size", [1000, 3 * CHUNK_BYTES + 7], ids=lambda s: f"{s}B")
def test_a_range_past_the_end_is_a_416_and_a_malformed_one_is_ignored(
    tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    with TestClient(_file_app(tmp_path / "image.png", data, [])) as client:
        beyond = client.get("/file", headers={"Range": f"bytes={size}-"})
        assert beyond.status_code == 416
        assert_error_shape(beyond.json(), "RangeNotSatisfiable")
        assert beyond.headers["content-range"] == f"bytes */{size}"
        # RFC 9110 14.2: a Range the server cannot parse is ignored; the whole file is sent.
        for malformed in ("lines=1-2", "bytes=", "bytes=9-3", "bytes=x-y"):
            whole = client.get("/file", headers={"Range": malformed})
            assert whole.status_code == 200, malformed
            assert whole.content == data
            assert "content-range" not in whole.headers


def test_a_file_read_whole_sends_the_headers_a_file_response_sends(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(os.urandom(5000))
    app = FastAPI()

    @app.get("/read")
    async def read(request: Request) -> Response:
        located = LocalImageFile("k", path, "image/png", None)
        return await file_response(request, located, "no-cache")

    @app.get("/starlette")
    async def starlette() -> Response:
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type="image/png", headers=headers)

    with TestClient(app) as client:
        ours, theirs = client.get("/read"), client.get("/starlette")
    assert ours.content == theirs.content
    assert dict(ours.headers) == dict(theirs.headers)  # etag from the file's stat, as Starlette's


# ------------------------------------------------------------------ express routes


def _scope(method: str, path: str, query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query}


def test_the_express_routes_take_only_requests_they_can_answer() -> None:
    image, thumbnail = mv.EXPRESS_ROUTES
    image_id = str(uuid.uuid4())
    path = f"/api/mv/get_character_reference/{image_id}"

    def decision(route: ExpressRoute, method: str, path: str, query: bytes = b"") -> Match:
        return route.matches(_scope(method, path, query))[0]

    for method, query in [
        ("GET", b""),
        ("HEAD", b""),
        ("GET", b"redirect=true"),
        ("GET", b"redirect=false"),
        ("GET", b"expires=1&signature=abc&redirect=true"),  # a signed URL: checked before routing
        ("GET", b"redirect=%74rue"),
    ]:
        assert decision(image, method, path, query) == Match.FULL, (method, query)
    assert image.matches(_scope("GET", path, b"redirect=true"))[1]["path_params"] == {
        "image_id": image_id
    }
    # Everything else is the documented route's to validate and answer.
    for method, candidate, query in [
        ("POST", path, b""),
        ("DELETE", path, b""),
        ("GET", f"/api/mv/get_character_reference/{image_id.upper()}", b""),
        ("GET", path.replace("-", ""), b""),
        ("GET", path + "/", b""),
        ("GET", path + ".png", b""),
        ("GET", path, b"redirect=yes"),
        ("GET", path, b"redirect="),
        ("GET", path, b"redirect"),
        ("GET", path, b"redirect=true&redirect=maybe"),
    ]:
        assert decision(image, method, candidate, query) == Match.NONE, (method, candidate, query)

    thumbnail_path = f"/api/mv/character_references/{image_id}/thumbnail"
    assert decision(thumbnail, "GET", f"{thumbnail_path}/256") == Match.FULL
    assert decision(thumbnail, "GET", f"{thumbnail_path}/512") == Match.FULL
    assert decision(thumbnail, "GET", f"{thumbnail_path}/128") == Match.NONE
    assert decision(thumbnail, "GET", f"{thumbnail_path}/2560") == Match.NONE


@pytest.fixture
def express_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the express routes answered, in order."""
    calls: list[str] = []
    handle = ExpressRoute.handle

    async def counting(self: ExpressRoute, scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await handle(self, scope, receive, send)

    monkeypatch.setattr(ExpressRoute, "handle", counting)
    yield calls


def _same_reply(express: Any, documented: Any) -> None:
    assert express.status_code == documented.status_code
    assert express.content == documented.content
    assert {k: v for k, v in express.headers.items() if k not in PER_REPLY} == {
        k: v for k, v in documented.headers.items() if k not in PER_REPLY
    }


@pytest.mark.parametrize("serving", ["bytes", "cloud"])
def test_an_express_reply_is_the_documented_routes_reply(
    make_api: Callable[..., ApiHarness], express_calls: list[str], serving: str
) -> None:
    api = make_api() if serving == "bytes" else make_api("s3", serve_from_cloud=True)
    image_id = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes())}
    ).json()["id"]
    missing = str(uuid.uuid4())
    # Each pair asks for the same thing; the second spelling (an upper-case id, `redirect=1`)
    # is one the express route leaves to the documented route.
    pairs = [
        (f"/api/mv/get_character_reference/{image_id}", image_id.upper()),
        (f"/api/mv/get_character_reference/{image_id}?redirect=true", "redirect=1"),
        (f"/api/mv/get_character_reference/{image_id}?redirect=false", "redirect=0"),
        (f"/api/mv/character_references/{image_id}/thumbnail/256", image_id.upper()),
        (f"/api/mv/get_character_reference/{missing}", missing.upper()),
    ]
    for express_path, other_spelling in pairs:
        if other_spelling.startswith("redirect="):
            documented_path = express_path.replace(express_path.partition("?")[2], other_spelling)
        else:
            documented_path = express_path.replace(other_spelling.lower(), other_spelling)
        express_calls.clear()
        express = api.client.get(express_path, follow_redirects=False)
        assert express_calls == [express_path.partition("?")[0]]
        documented = api.client.get(documented_path, follow_redirects=False)
        assert express_calls == [express_path.partition("?")[0]]  # not the express route's
        _same_reply(express, documented)
    assert_error_shape(express.json(), "NotFound")

    head = api.client.head(f"/api/mv/get_character_reference/{image_id}")
    assert head.status_code == 200
    assert head.content == b""


def test_what_the_express_routes_leave_is_answered_as_before(
    make_api: Callable[..., ApiHarness], express_calls: list[str]
) -> None:
    api = make_api()
    image_id = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes())}
    ).json()["id"]
    path = f"/api/mv/get_character_reference/{image_id}"
    express_calls.clear()

    unclear = api.client.get(f"{path}?redirect=maybe")
    assert unclear.status_code == 422
    fields = assert_error_shape(unclear.json(), "ValidationError")["fields"]
    assert fields[0]["loc"] == ["query", "redirect"]

    posted = api.client.post(path)
    assert posted.status_code == 405
    assert_error_shape(posted.json(), "MethodNotAllowed")

    too_big = api.client.get(f"/api/mv/character_references/{image_id}/thumbnail/1024")
    assert too_big.status_code == 422
    assert express_calls == []


def test_an_express_reply_is_counted_under_its_route_and_needs_a_key(
    make_api: Callable[..., ApiHarness], express_calls: list[str]
) -> None:
    api = make_api(api_keys=API_KEY)
    keyed = {"X-API-Key": API_KEY}
    stored = api.client.post(
        "/api/mv/upload_character_reference",
        files={"file": ("a.png", image_bytes())},
        headers=keyed,
    ).json()
    path = f"/api/mv/get_character_reference/{stored['id']}"
    express_calls.clear()

    assert api.client.get(path).status_code == 401  # refused before any route
    assert api.client.get(path, headers=keyed).status_code == 200
    assert api.client.get(stored["url"]).status_code == 200  # the signed URL, no key
    assert express_calls == [path, path]

    text = api.client.get("/metrics").text
    route = "/api/mv/get_character_reference/{image_id}"
    assert f'mv_http_requests_total{{method="GET",route="{route}",status="200"}} 2.0' in text

"""One error shape everywhere, declared in the OpenAPI document; docs that work offline."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from conftest import ApiHarness, assert_error_shape

ORIGIN = "http://studio.example"


@pytest.fixture
def api(make_api: Callable[..., ApiHarness]) -> ApiHarness:
    return make_api(cors_origins=ORIGIN)


def test_an_unknown_route_is_a_404_in_the_shape(api: ApiHarness) -> None:
    reply = api.client.get("/api/mv/no_such_thing")
    assert reply.status_code == 404
    detail = assert_error_shape(reply.json(), "NotFound")
    assert "/api/mv/no_such_thing" in detail["message"]


def test_a_wrong_method_is_a_405_in_the_shape_with_allow(api: ApiHarness) -> None:
    reply = api.client.put("/api/mv/jobs")
    assert reply.status_code == 405
    assert_error_shape(reply.json(), "MethodNotAllowed")
    assert "POST" in reply.headers["allow"]


def test_a_refused_cors_preflight_is_json_in_the_shape(api: ApiHarness) -> None:
    reply = api.client.options(
        "/api/mv/jobs",
        headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    detail = assert_error_shape(reply.json(), "CorsRefused")
    assert "origin" in detail["message"]
    allowed = api.client.options(
        "/api/mv/jobs", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN


def test_validation_errors_name_each_field(api: ApiHarness) -> None:
    reply = api.client.post(
        "/api/mv/generate_character_reference",
        json={"character_description": "", "num_images": 9},
    )
    assert reply.status_code == 422
    detail = assert_error_shape(reply.json(), "ValidationError")
    locs = [problem["loc"] for problem in detail["fields"]]
    assert ["body", "character_description"] in locs
    assert ["body", "num_images"] in locs
    assert all(set(problem) == {"loc", "message"} for problem in detail["fields"])
    assert detail["message"].startswith("body.character_description")


def test_a_body_that_is_not_json_is_named_as_the_body(api: ApiHarness) -> None:
    reply = api.client.post(
        "/api/mv/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 422
    detail = assert_error_shape(reply.json(), "ValidationError")
    assert detail["fields"][0]["loc"] == ["body"]


def test_middleware_errors_share_the_shape(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(api_keys="shape-key-0123456789abcdef", url_signing_secret="s" * 32)
    unauthorized = api.client.get("/api/mv/jobs/some-job")
    assert unauthorized.status_code == 401
    assert_error_shape(unauthorized.json(), "Unauthorized")
    too_large = api.client.post(
        "/api/mv/jobs",
        content=b"x" * (2 * 1024 * 1024),
        headers={"X-API-Key": "shape-key-0123456789abcdef", "Content-Type": "application/json"},
    )
    assert too_large.status_code == 413
    assert_error_shape(too_large.json(), "TooLarge")


def test_no_reply_echoes_more_than_200_characters_of_input(api: ApiHarness) -> None:
    long_id = "j" * 5000
    reply = api.client.get(f"/api/mv/jobs/{long_id}")
    assert reply.status_code == 422
    assert "j" * 201 not in reply.text
    missing = api.client.get("/api/mv/" + "x" * 5000)
    assert missing.status_code == 404
    assert "x" * 201 not in missing.text


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_server(api: ApiHarness, page: str) -> None:
    html = api.client.get(page)
    assert html.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert sources
    for source in sources:
        assert source.startswith("/"), f"{page} loads {source} from elsewhere"
        asset = api.client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 1000, source

"""Schema fuzzing: schemathesis drives every operation of the app's own OpenAPI schema, in
local and S3 mode (serving bytes, and serving from the cloud), with API keys on, over real HTTP
to a uvicorn server on 127.0.0.1.

Every reply must be a non-5xx that matches the schema: a documented status, content type,
headers and body (JSON against its schema; binary bodies are what their type says, whole).
Data the schema calls invalid must be refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config import REPO_ROOT, Settings, load_settings
from conftest import TEST_SIGNING_SECRET, image_bytes, moto_credentials, s3_settings, wait_until
from live_server import serve
from main import create_app

API_KEY = "fuzz-key-0123456789abcdef"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES_PER_OPERATION = 25
# The leading bytes of each binary type the API serves.
MAGIC = {
    "image/png": lambda body: body.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/jpeg": lambda body: body.startswith(b"\xff\xd8\xff"),
    "image/webp": lambda body: body[:4] == b"RIFF" and body[8:12] == b"WEBP",
}
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def binary_body_conformance(ctx: Any, response: Any, case: Any) -> None:
    """A binary reply is whole and what its type says: Content-Length is its size, a 200
    image starts with its format's signature, a 206 holds exactly the bytes Content-Range names,
    a 304 has no body and a 307 points at an absolute URL."""
    headers = {name: values[-1] for name, values in response.headers.items()}
    body: bytes = response.content
    media_type = headers.get("content-type", "").partition(";")[0]
    if response.status_code in (200, 206) and media_type != "application/json":
        assert int(headers["content-length"]) == len(body), "Content-Length is not the body's size"
    if response.status_code == 200 and media_type in MAGIC:
        assert MAGIC[media_type](body), f"a 200 {media_type} body is not {media_type}"
    if response.status_code == 206 and media_type != "multipart/byteranges":
        first, last, size = map(int, CONTENT_RANGE.fullmatch(headers["content-range"]).groups())
        assert len(body) == last - first + 1 and last < size, "206 body and Content-Range differ"
    if response.status_code == 304:
        assert body == b"", "a 304 has a body"
    if response.status_code == 307:
        assert headers["location"].startswith("http"), "a 307 Location is not an absolute URL"


CHECKS.append(binary_body_conformance)


@pytest.fixture(scope="module", params=["local", "s3", "cloud"])
def fuzz_target(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_sdxl_turbo: Path,
) -> Iterator[dict[str, Any]]:
    """A live server with API keys on, a stored image and a job, in one storage mode."""
    with moto_credentials():
        yield from _live_target(request, tmp_path_factory, tiny_sdxl_turbo)


def _live_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model: Path
) -> Iterator[dict[str, Any]]:
    overrides: dict[str, Any] = {
        "output_dir": tmp_path_factory.mktemp("fuzz") / "outputs",
        "local_model_id": str(model),
        "local_device": "cpu",
        "api_keys": API_KEY,
        "url_signing_secret": TEST_SIGNING_SECRET,
        "max_queued_generations": 64,
    }
    if request.param in ("s3", "cloud"):
        overrides.update(s3_settings(request, serve_from_cloud=request.param == "cloud"))
    settings_: Settings = load_settings(_env_file=REPO_ROOT / ".env.test", **overrides)
    app = create_app(settings_)
    with serve(app) as base_url:
        headers = {"X-API-Key": API_KEY}
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            wait_until(lambda: client.get("/ready").status_code == 200, timeout=60)
            upload = client.post(
                "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes())}
            )
            assert upload.status_code == 201
            assert client.post("/api/mv/jobs", json={"job_id": "fuzz-job"}).status_code == 201
            image_id = upload.json()["id"]
            attach = client.post(
                "/api/mv/jobs/fuzz-job/character_references", json={"image_ids": [image_id]}
            )
            assert attach.status_code == 200
            served = client.get("/openapi.json").json()
        yield {
            "mode": request.param,
            "base_url": base_url,
            "openapi": served,
            "image_id": image_id,
        }


def _served_schema() -> Any:
    """The schema the app serves with API keys on (the same in every storage mode)."""
    settings_ = load_settings(
        _env_file=REPO_ROOT / ".env.test", api_keys=API_KEY, url_signing_secret=TEST_SIGNING_SECRET
    )
    return schemathesis.openapi.from_dict(create_app(settings_).openapi())


schema = _served_schema()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,  # the same cases on every run; raise EXAMPLES_PER_OPERATION to dig deeper
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_within_its_schema(case: Any, fuzz_target: dict[str, Any]) -> None:
    case.call_and_validate(
        base_url=fuzz_target["base_url"],
        headers={"X-API-Key": API_KEY},
        checks=CHECKS,
        timeout=60,
    )


SERVED_FILES = [
    ("/api/mv/get_character_reference/{image_id}", {}),
    ("/api/mv/character_references/{image_id}/thumbnail/{size}", {"size": 256}),
    ("/api/mv/jobs/{job_id}/character_references/{image_id}", {"job_id": "fuzz-job"}),
    (
        "/api/mv/jobs/{job_id}/character_references/{image_id}/thumbnail/{size}",
        {"job_id": "fuzz-job", "size": 512},
    ),
    ("/api/mv/jobs/{job_id}/assets/{path}", {"job_id": "fuzz-job"}),
]
# Ways a client asks for a file: whole, redirected, in part, conditionally.
FILE_REQUESTS = {
    "plain": ({}, {}),
    "redirect": ({"redirect": True}, {}),
    "range": ({}, {"Range": "bytes=0-99"}),
    "ranges": ({}, {"Range": "bytes=0-9,20-29"}),
    "range past the end": ({}, {"Range": "bytes=99999999-"}),
    "malformed range": ({}, {"Range": "lines=1-2"}),
    "current etag": ({}, {"If-None-Match": "CURRENT"}),
    "stale etag": ({}, {"If-None-Match": '"stale"'}),
}


@pytest.mark.parametrize("path", [path for path, _ in SERVED_FILES])
def test_served_files_match_the_schema_however_they_are_asked_for(
    path: str, fuzz_target: dict[str, Any]
) -> None:
    """Fuzzed ids name no stored file; these calls name one, in every way a client may ask
    (the bytes, a redirect, ranges, If-None-Match), and validate each reply as the fuzzing does."""
    image_id = fuzz_target["image_id"]
    parameters = {"image_id": image_id, **dict(SERVED_FILES)[path]}
    if "{path}" in path:
        parameters = {"job_id": "fuzz-job", "path": f"character_reference/{image_id}.png"}
    operation = schema[path]["GET"]
    statuses = set()
    for query, headers in FILE_REQUESTS.values():
        headers = {"X-API-Key": API_KEY, **headers}
        if headers.get("If-None-Match") == "CURRENT":
            first = operation.Case(path_parameters=parameters, headers={"X-API-Key": API_KEY})
            (etag,) = first.call(base_url=fuzz_target["base_url"]).headers.get("etag", ['"none"'])
            headers["If-None-Match"] = etag
        case = operation.Case(path_parameters=parameters, query=query, headers=headers)
        reply = case.call_and_validate(base_url=fuzz_target["base_url"], checks=CHECKS)
        statuses.add(reply.status_code)
    if fuzz_target["mode"] == "cloud":
        expected = {307} if "thumbnail" in path else {200, 307}
    else:
        expected = {200, 206, 304, 416}
    assert statuses == expected


def test_no_operation_under_api_answers_without_the_key(fuzz_target: dict[str, Any]) -> None:
    served = {**fuzz_target["openapi"]}
    assert served.pop("servers") == [{"url": fuzz_target["base_url"]}]
    assert served == schema.raw_schema  # what was fuzzed is what is served
    operations = [
        (method.upper(), path)
        for path, item in fuzz_target["openapi"]["paths"].items()
        for method in item
        if path.startswith("/api/")
    ]
    assert len(operations) >= 10
    with httpx.Client(base_url=fuzz_target["base_url"]) as client:
        for method, path in operations:
            url = path.replace("{job_id}", "fuzz-job").replace("{image_id}", "x")
            url = url.replace("{generation_id}", "x").replace("{path}", "a.txt")
            for headers in ({}, {"X-API-Key": API_KEY[:-1]}, {"X-API-Key": API_KEY + "x"}):
                reply = client.request(method, url, headers=headers)
                assert reply.status_code == 401, (method, url, headers)
                assert reply.headers["WWW-Authenticate"] == "ApiKey"


def test_fuzzing_reached_every_operation_and_caused_no_5xx(fuzz_target: dict[str, Any]) -> None:
    """The server's own request metrics, after the fuzzing above: every operation of the
    schema was called, and no reply was a 5xx."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=fuzz_target["base_url"]) as client:
        families = text_string_to_metric_families(client.get("/metrics").text)
    samples = [
        sample.labels | {"count": sample.value}
        for family in families
        if family.name == "mv_http_requests"
        for sample in family.samples
        if sample.name == "mv_http_requests_total"
    ]
    called = {(s["method"], s["route"].replace(":path}", "}")) for s in samples}
    operations = {
        (method.upper(), path)
        for path, item in fuzz_target["openapi"]["paths"].items()
        for method in item
    }
    assert operations <= called, operations - called
    server_errors = [s for s in samples if s["status"].startswith("5") and s["route"] != "/ready"]
    assert server_errors == []
    total = sum(s["count"] for s in samples)
    print(f"{fuzz_target['mode']}: {total:.0f} requests over {len(operations)} operations")
    assert total > 10 * len(operations)

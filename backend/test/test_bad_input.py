"""The bad-input catalogue: each hostile or malformed request, and the status it must get.

Requests go over real HTTP to a uvicorn server on 127.0.0.1. Paths are sent exactly as
written (no client-side normalisation of `..`), the way `curl --path-as-is` sends them.
"""

from __future__ import annotations

import http.client
import json
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from config import REPO_ROOT, load_settings
from conftest import ApiHarness, image_bytes, wait_until
from live_server import serve
from main import create_app
from mv.character_reference import MAX_DESCRIPTION_CHARS, MAX_SEED
from mv.jobs import MAX_METADATA_BYTES

GENERATE = "/api/mv/generate_character_reference"
UPLOAD = "/api/mv/upload_character_reference"
JOBS = "/api/mv/jobs"
SECRET_NAME = "secret.png"  # planted outside every job: what traversal would aim at


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_turbo: Path) -> Iterator[str]:
    """A live server in local mode with one job ("j") and one stored image."""
    outputs = tmp_path_factory.mktemp("bad-input") / "outputs"
    settings = load_settings(
        _env_file=REPO_ROOT / ".env.test",
        output_dir=outputs,
        local_model_id=str(tiny_sdxl_turbo),
        local_device="cpu",
    )
    (outputs / SECRET_NAME).parent.mkdir(parents=True, exist_ok=True)
    (outputs / SECRET_NAME).write_bytes(b"not for clients")
    with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, timeout=60)
        assert client.post(JOBS, json={"job_id": "j"}).status_code == 201
        yield base_url


def raw_request(
    base_url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    """Send `path` byte for byte (http.client does not resolve `..`); return status and body."""
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def field_of(body: bytes) -> list[Any]:
    """The `loc` of the first validation error in a 422 reply."""
    return json.loads(body)["detail"]["fields"][0]["loc"]


# (name, method, path, JSON body or None, expected status, the field a 422 must name)
CATALOGUE: list[tuple[str, str, str, Any, int, list[Any] | None]] = [
    # Traversal, plain and encoded: never a file, never a 5xx.
    ("dotdot image id", "GET", "/api/mv/get_character_reference/../../secret.png", None, 404, None),
    (
        "encoded slash image id",
        "GET",
        "/api/mv/get_character_reference/..%2F..%2Fsecret.png",
        None,
        404,
        None,
    ),
    (
        "encoded dotdot image id",
        "GET",
        "/api/mv/get_character_reference/%2e%2e",
        None,
        422,
        ["path", "image_id"],
    ),
    (
        "dotdot asset path",
        "GET",
        "/api/mv/jobs/j/assets/../../secret.png",
        None,
        422,
        ["path", "path"],
    ),
    (
        "encoded dotdot asset path",
        "GET",
        "/api/mv/jobs/j/assets/%2e%2e/%2e%2e/secret.png",
        None,
        422,
        ["path", "path"],
    ),
    (
        "encoded slash asset path",
        "GET",
        "/api/mv/jobs/j/assets/..%2F..%2Fsecret.png",
        None,
        422,
        ["path", "path"],
    ),
    (
        "backslash asset path",
        "GET",
        "/api/mv/jobs/j/assets/..%5C..%5Csecret.png",
        None,
        422,
        ["path", "path"],
    ),
    ("NUL in asset path", "GET", "/api/mv/jobs/j/assets/a%00.png", None, 422, ["path", "path"]),
    (
        "reserved dot folder",
        "GET",
        "/api/mv/jobs/j/assets/.storage/pending",
        None,
        422,
        ["path", "path"],
    ),
    (
        "absolute asset path",
        "GET",
        "/api/mv/jobs/j/assets//etc/passwd",
        None,
        422,
        ["path", "path"],
    ),
    ("encoded dotdot job id", "GET", "/api/mv/jobs/%2e%2e", None, 422, ["path", "job_id"]),
    ("dotdot job id in a body", "POST", JOBS, {"job_id": "../j"}, 422, ["body", "job_id"]),
    (
        "slash job id in a generation",
        "POST",
        GENERATE,
        {"character_description": "a", "job_id": "a/b"},
        422,
        ["body", "job_id"],
    ),
    # Ids that are not what they should be.
    (
        "non-UUID image id",
        "GET",
        "/api/mv/get_character_reference/not-a-uuid",
        None,
        422,
        ["path", "image_id"],
    ),
    (
        "numeric image id",
        "GET",
        "/api/mv/character_references/123/metadata",
        None,
        422,
        ["path", "image_id"],
    ),
    (
        "image id with extension",
        "GET",
        f"/api/mv/get_character_reference/{uuid.uuid4()}.png",
        None,
        422,
        ["path", "image_id"],
    ),
    (
        "non-UUID generation id",
        "GET",
        "/api/mv/character_reference_jobs/nope",
        None,
        422,
        ["path", "generation_id"],
    ),
    (
        "non-UUID image to attach",
        "POST",
        f"{JOBS}/j/character_references",
        {"image_ids": ["nope"]},
        422,
        ["body", "image_ids"],
    ),
    ("job id too long", "GET", f"{JOBS}/{'a' * 129}", None, 422, ["path", "job_id"]),
    (
        "unknown image (well-formed)",
        "GET",
        f"/api/mv/get_character_reference/{uuid.uuid4()}",
        None,
        404,
        None,
    ),
    # Sizes.
    (
        "description too long",
        "POST",
        GENERATE,
        {"character_description": "a" * (MAX_DESCRIPTION_CHARS + 1)},
        422,
        ["body", "character_description"],
    ),
    (
        "empty description",
        "POST",
        GENERATE,
        {"character_description": ""},
        422,
        ["body", "character_description"],
    ),
    (
        "negative prompt too long",
        "POST",
        GENERATE,
        {"character_description": "a", "negative_prompt": "n" * (MAX_DESCRIPTION_CHARS + 1)},
        422,
        ["body", "negative_prompt"],
    ),
    (
        "metadata over 16 KB",
        "POST",
        JOBS,
        {"job_id": "big", "metadata": {"x": "a" * MAX_METADATA_BYTES}},
        422,
        ["body", "metadata"],
    ),
    (
        "too many images to attach",
        "POST",
        f"{JOBS}/j/character_references",
        {"image_ids": [str(uuid.uuid4()) for _ in range(17)]},
        422,
        ["body", "image_ids"],
    ),
    (
        "no images to attach",
        "POST",
        f"{JOBS}/j/character_references",
        {"image_ids": []},
        422,
        ["body", "image_ids"],
    ),
    # Numbers out of range, and of the wrong type.
    (
        "zero images",
        "POST",
        GENERATE,
        {"character_description": "a", "num_images": 0},
        422,
        ["body", "num_images"],
    ),
    (
        "five images",
        "POST",
        GENERATE,
        {"character_description": "a", "num_images": 5},
        422,
        ["body", "num_images"],
    ),
    (
        "images as a string",
        "POST",
        GENERATE,
        {"character_description": "a", "num_images": "2"},
        422,
        ["body", "num_images"],
    ),
    (
        "negative seed",
        "POST",
        GENERATE,
        {"character_description": "a", "seed": -1},
        422,
        ["body", "seed"],
    ),
    (
        "seed over the maximum",
        "POST",
        GENERATE,
        {"character_description": "a", "seed": MAX_SEED + 1},
        422,
        ["body", "seed"],
    ),
    (
        "float seed",
        "POST",
        GENERATE,
        {"character_description": "a", "seed": 1.5},
        422,
        ["body", "seed"],
    ),
    # Unknown enum values.
    (
        "unknown aspect ratio",
        "POST",
        GENERATE,
        {"character_description": "a", "aspect_ratio": "7:3"},
        422,
        ["body", "aspect_ratio"],
    ),
    (
        "unknown output format",
        "POST",
        GENERATE,
        {"character_description": "a", "output_format": "gif"},
        422,
        ["body", "output_format"],
    ),
    (
        "unknown backend",
        "POST",
        GENERATE,
        {"character_description": "a", "backend": "dalle"},
        422,
        ["body", "backend"],
    ),
    (
        "boolean as a string",
        "POST",
        GENERATE,
        {"character_description": "a", "include_base64": "yes"},
        422,
        ["body", "include_base64"],
    ),
    (
        "webhook on the sync route",
        "POST",
        GENERATE,
        {"character_description": "a", "webhook_url": "https://x.example"},
        422,
        ["body", "webhook_url"],
    ),
    (
        "webhook that is not http",
        "POST",
        "/api/mv/character_reference_jobs",
        {"character_description": "a", "webhook_url": "file:///etc/passwd"},
        422,
        ["body", "webhook_url"],
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [case[1:] for case in CATALOGUE],
    ids=[case[0] for case in CATALOGUE],
)
def test_catalogue(
    server: str, method: str, path: str, body: Any, status: int, field: list[Any] | None
) -> None:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    got, reply = raw_request(server, method, path, data, headers)
    assert got == status, reply[:300]
    assert b"not for clients" not in reply
    assert b"Traceback" not in reply
    if field is not None:
        assert field_of(reply) == field


def test_json_body_over_1_mb_is_a_413_before_it_is_read(server: str) -> None:
    big = json.dumps({"job_id": "huge", "metadata": {"x": "a" * 2_000_000}}).encode()
    status, reply = raw_request(server, "POST", JOBS, big, {"Content-Type": "application/json"})
    assert status == 413
    assert json.loads(reply)["detail"]["error"] == "TooLarge"


def test_streamed_json_body_over_1_mb_is_a_413(server: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"job_id": "huge", "metadata": {"x": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}}'

    with httpx.Client(base_url=server) as client:
        reply = client.post(JOBS, content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["detail"]["error"] == "TooLarge"
    with httpx.Client(base_url=server) as client:
        assert client.get(f"{JOBS}/huge").status_code == 404  # nothing was created


def test_idempotency_key_too_long_is_a_422_naming_the_header(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        reply = client.post(JOBS, json={}, headers={"Idempotency-Key": "k" * 256})
    assert reply.status_code == 422
    assert reply.json()["detail"]["fields"][0]["loc"] == ["header", "Idempotency-Key"]


def test_body_that_is_not_utf8_is_a_422_naming_the_body(server: str) -> None:
    status, reply = raw_request(
        server, "POST", JOBS, b"\xff\xfe{}", {"Content-Type": "application/json"}
    )
    assert status == 422
    assert field_of(reply)[0] == "body"


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A real bomb: a 20000x20000 (400-megapixel) black PNG that is about 100 KB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("bomb.png", decompression_bomb_png(), 415),
        ("notes.png", b"just some text, named like an image", 415),
        ("cut.png", image_bytes("PNG")[:60], 415),
        ("script.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>', 415),
    ],
    ids=["decompression bomb", "text named .png", "truncated PNG", "SVG"],
)
def test_uploads_that_are_not_safe_images_are_refused(
    server: str, tmp_path: Path, name: str, data: bytes, status: int
) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        reply = client.post(UPLOAD, files={"file": (name, data, "image/png")})
    assert reply.status_code == status
    assert reply.json()["detail"]["error"] == "UnsupportedImage"


def test_upload_over_10_mb_is_a_413(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        reply = client.post(UPLOAD, files={"file": ("big.png", b"\x00" * (10 * 1024 * 1024 + 1))})
    assert reply.status_code == 413


# ------------------------------------------------------------------------ redirects


def test_redirects_cannot_be_steered_elsewhere(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api("s3", serve_from_cloud=True)
    image_id = api.client.post(UPLOAD, files={"file": ("a.png", image_bytes())}).json()["id"]
    s3_host = urlsplit(api.settings.aws_endpoint_url).netloc
    hostile = {
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "javascript",
        "Referer": "https://evil.example/",
    }
    for query in (
        "redirect=true",
        "redirect=true&url=https://evil.example/",
        "redirect=true&next=//evil.example",
    ):
        reply = api.client.get(
            f"/api/mv/get_character_reference/{image_id}?{query}",
            headers=hostile,
            follow_redirects=False,
        )
        assert reply.status_code == 307
        location = urlsplit(reply.headers["location"])
        assert location.netloc == s3_host  # always the bucket's endpoint
        assert (
            location.path == f"/{api.settings.storage_bucket}/character_references/{image_id}.png"
        )
        assert "evil" not in reply.headers["location"]
    # Local-mode URLs are relative to the API (or PUBLIC_BASE_URL), never built from Host.
    local = make_api("local")
    reply = local.client.post(UPLOAD, files={"file": ("a.png", image_bytes())}, headers=hostile)
    assert reply.json()["url"].startswith("/api/mv/")


def test_config_debug_never_shows_a_secret(make_api: Callable[..., ApiHarness]) -> None:
    from fake_replicate import FakeReplicate

    secrets = {
        "replicate_api_token": "r8_catalogue-secret-token",
        "webhook_secret": "whsec_Y2F0YWxvZ3VlLXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3",
        "api_keys": "catalogue-api-key-0123456789,second-catalogue-key-0123",
        "url_signing_secret": "catalogue-url-signing-secret-0123456789",
    }
    api = make_api("s3", replicate=FakeReplicate(), debug_endpoints=True, **secrets)
    headers = {"X-API-Key": "second-catalogue-key-0123"}
    reply = api.client.get("/api/mv/config/debug", headers=headers)
    assert reply.status_code == 200
    for value in [*secrets.values(), *secrets["api_keys"].split(","), "testing"]:
        assert value not in reply.text
    assert make_api("local").client.get("/api/mv/config/debug").status_code == 404

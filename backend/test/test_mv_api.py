"""The /api/mv endpoints in local and S3 mode, with the tiny local model."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from conftest import API_S3_MODES, ApiHarness, image_bytes

WEBHOOK_SECRET = "whsec_c2VjcmV0LXdlYmhvb2stdmFsdWUtZm9yLWRlYnVnLXRlc3Q="

GENERATE = "/api/mv/generate_character_reference"
UPLOAD = "/api/mv/upload_character_reference"


def image_url(image_id: str) -> str:
    """The API path that serves an image."""
    return f"/api/mv/get_character_reference/{image_id}"


def stored_files(harness: ApiHarness) -> list[Path]:
    """Every character reference file in the local tier."""
    root = harness.settings.output_dir / "character_references"
    return sorted(root.iterdir()) if root.is_dir() else []


@pytest.fixture(params=["local", *API_S3_MODES])
def api(request: pytest.FixtureRequest, make_api: Callable[..., ApiHarness]) -> ApiHarness:
    """The app in each storage mode (S3 on each server), serving bytes."""
    return make_api(request.param)


@pytest.fixture(params=list(API_S3_MODES))
def cloud_api(
    request: pytest.FixtureRequest, make_api: Callable[..., ApiHarness]
) -> Iterator[ApiHarness]:
    """The app in S3 mode (on each server), serving presigned URLs."""
    yield make_api(request.param, serve_from_cloud=True)


def upload(harness: ApiHarness, data: bytes, name: str = "me.png") -> dict:
    """Upload `data` and return the 201 reply."""
    reply = harness.client.post(UPLOAD, files={"file": (name, data, "application/octet-stream")})
    assert reply.status_code == 201, reply.text
    return reply.json()


# ------------------------------------------------------------------ generation


def test_generate_stores_every_image_and_serves_it(api: ApiHarness) -> None:
    reply = api.client.post(GENERATE, json={"character_description": "a silver robot", "seed": 10})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    images, metadata = body["images"], body["metadata"]
    assert len(images) == 4
    assert len({image["id"] for image in images}) == 4
    assert [image["seed"] for image in images] == [10, 11, 12, 13]
    assert metadata["num_images_requested"] == metadata["num_images_generated"] == 4
    assert metadata["backend"] == "local"
    assert metadata["fallback_reason"] is None
    assert metadata["parameters_used"]["family"] == "sdxl-turbo"
    assert metadata["generation_time_ms"] > 0
    for image in images:
        assert (image["width"], image["height"]) == (512, 512)  # SDXL-Turbo: 1:1 at half scale
        assert image["content_type"] == "image/png"
        assert image["path"] == f"character_references/{image['id']}.png"
        data = base64.b64decode(image["base64"])
        fetched = api.fetch(image["url"])
        assert fetched.status_code == 200
        assert fetched.content == data
        assert api.client.get(image_url(image["id"])).content == data
        if api.s3 is not None:
            assert image["cloud_url"] == image["url"]
            stored = api.s3.get_object(Bucket=api.settings.storage_bucket, Key=image["path"])
            assert stored["Body"].read() == data
        else:
            assert image["cloud_url"] is None
    sidecar = api.client.get(f"/api/mv/character_references/{images[1]['id']}/metadata").json()
    assert sidecar["seed"] == 11
    assert sidecar["description"] == "a silver robot"
    assert sidecar["backend"] == "local"
    assert sidecar["sha256"] == hashlib.sha256(base64.b64decode(images[1]["base64"])).hexdigest()


def test_generate_with_job_id_stores_under_the_job_too(api: ApiHarness) -> None:
    assert api.client.post("/api/mv/jobs", json={"job_id": "job-7"}).status_code == 201
    reply = api.client.post(
        GENERATE,
        json={"character_description": "a fox", "num_images": 1, "job_id": "job-7", "seed": 1},
    )
    image = reply.json()["images"][0]
    job_key = f"jobs/job-7/character_reference/{image['id']}.png"
    assert (api.settings.output_dir / job_key).read_bytes() == base64.b64decode(image["base64"])
    if api.s3 is not None:
        api.s3.head_object(Bucket=api.settings.storage_bucket, Key=job_key)


def test_generate_with_job_id_lists_the_images_in_the_job(api: ApiHarness) -> None:
    assert api.client.post("/api/mv/jobs", json={"job_id": "job-8"}).status_code == 201
    reply = api.client.post(
        GENERATE,
        json={"character_description": "a fox", "num_images": 2, "job_id": "job-8", "seed": 3},
    )
    assert reply.status_code == 200, reply.text
    images = reply.json()["images"]
    job = api.client.get("/api/mv/jobs/job-8").json()
    listed = {ref["image_id"]: ref for ref in job["character_references"]}
    assert set(listed) == {image["id"] for image in images}
    for image in images:  # exactly as the attach route lists them
        data = base64.b64decode(image["base64"])
        assert listed[image["id"]]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[image["id"]]["path"] == f"character_reference/{image['id']}.png"
        url = listed[image["id"]]["url"]  # a presigned URL of the moto server in S3 mode
        fetched = httpx.get(url) if url.startswith("http") else api.client.get(url)
        assert fetched.content == data


def test_generate_with_an_unknown_job_id_is_a_404_and_stores_nothing(api: ApiHarness) -> None:
    for route in (GENERATE, "/api/mv/character_reference_jobs"):
        reply = api.client.post(
            route, json={"character_description": "a fox", "num_images": 1, "job_id": "no-job"}
        )
        assert reply.status_code == 404, reply.text
        assert reply.json()["detail"]["error"] == "NotFound"
        assert "no-job" in reply.json()["detail"]["message"]
    assert not (api.settings.output_dir / "jobs" / "no-job").exists()
    assert not list((api.settings.output_dir / "generations").glob("*.json"))
    assert api.client.get("/api/mv/jobs/no-job").status_code == 404
    if api.s3 is not None:
        listed = api.s3.list_objects_v2(Bucket=api.settings.storage_bucket, Prefix="jobs/no-job")
        assert listed["KeyCount"] == 0


@pytest.mark.parametrize(
    ("output_format", "content_type"), [("webp", "image/webp"), ("jpeg", "image/jpeg")]
)
def test_output_formats_and_no_base64(
    make_api: Callable[..., ApiHarness], output_format: str, content_type: str
) -> None:
    api = make_api()
    reply = api.client.post(
        GENERATE,
        json={
            "character_description": "a fox",
            "num_images": 2,
            "output_format": output_format,
            "include_base64": False,
            "aspect_ratio": "9:16",
        },
    )
    assert reply.status_code == 200, reply.text
    for image in reply.json()["images"]:
        assert image["base64"] is None
        assert image["content_type"] == content_type
        assert (image["width"], image["height"]) == (384, 672)
        served = api.client.get(image["url"])
        assert served.headers["content-type"] == content_type


def test_flux_sizes_follow_the_table_through_the_api(
    make_api: Callable[..., ApiHarness], tiny_flux: Path
) -> None:
    api = make_api(local_model_id=str(tiny_flux))
    reply = api.client.post(
        GENERATE,
        json={"character_description": "a fox", "num_images": 1, "aspect_ratio": "16:9"},
    )
    image = reply.json()["images"][0]
    assert (image["width"], image["height"]) == (1344, 768)
    assert reply.json()["metadata"]["parameters_used"]["num_inference_steps"] == 4


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "character_description"),
        ({"character_description": ""}, "character_description"),
        ({"character_description": "   \n\t "}, "character_description"),
        ({"character_description": "x" * 2001}, "character_description"),
        ({"character_description": 5}, "character_description"),
        ({"character_description": "a", "num_images": 0}, "num_images"),
        ({"character_description": "a", "num_images": 5}, "num_images"),
        ({"character_description": "a", "num_images": "four"}, "num_images"),
        ({"character_description": "a", "num_images": "4"}, "num_images"),
        ({"character_description": "a", "num_images": 2.5}, "num_images"),
        ({"character_description": "a", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"character_description": "a", "seed": -1}, "seed"),
        ({"character_description": "a", "seed": 2**40}, "seed"),
        ({"character_description": "a", "output_format": "gif"}, "output_format"),
        ({"character_description": "a", "backend": "cloud"}, "backend"),
        ({"character_description": "a", "job_id": "../etc"}, "job_id"),
        ({"character_description": "a", "include_base64": "yes"}, "include_base64"),
        ({"character_description": "a", "surprise": 1}, "surprise"),
    ],
)
def test_bad_generation_input_is_a_422_naming_the_field(
    make_api: Callable[..., ApiHarness], body: dict, field: str
) -> None:
    api = make_api()
    reply = api.client.post(GENERATE, json=body)
    assert reply.status_code == 422
    assert any(problem["loc"][-1] == field for problem in reply.json()["detail"]["fields"])
    assert stored_files(api) == []


def test_a_body_that_is_not_json_is_a_422(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    reply = api.client.post(
        GENERATE, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422


# --------------------------------------------------------------------- serving


def test_local_serving_headers_head_range_and_304(api: ApiHarness) -> None:
    data = image_bytes("PNG", (300, 200))
    image_id = upload(api, data)["id"]
    reply = api.client.get(image_url(image_id))
    assert reply.status_code == 200
    assert reply.content == data
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert "immutable" in reply.headers["cache-control"]
    assert "max-age=31536000" in reply.headers["cache-control"]
    assert reply.headers["x-content-type-options"] == "nosniff"

    head = api.client.head(image_url(image_id))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["etag"] == reply.headers["etag"]

    partial = api.client.get(image_url(image_id), headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.content == data[10:20]
    assert partial.headers["content-range"] == f"bytes 10-19/{len(data)}"

    cached = api.client.get(image_url(image_id), headers={"If-None-Match": reply.headers["etag"]})
    assert cached.status_code == 304
    assert cached.content == b""


def test_cloud_serving_gives_presigned_json_and_redirect(cloud_api: ApiHarness) -> None:
    data = image_bytes("JPEG")
    image_id = upload(cloud_api, data, "me.jpg")["id"]
    reply = cloud_api.client.get(image_url(image_id))
    assert reply.status_code == 200
    body = reply.json()
    assert body["image_id"] == image_id
    assert body["storage_backend"] == "s3"
    assert body["expires_in_seconds"] == cloud_api.settings.presigned_url_expiry
    assert body["cloud_path"] == f"character_references/{image_id}.jpg"
    assert body["content_type"] == "image/jpeg"
    assert body["expires_at"]
    assert f"X-Amz-Expires={cloud_api.settings.presigned_url_expiry}" in body["image_url"]
    assert cloud_api.fetch(body["image_url"]).content == data

    redirect = cloud_api.client.get(
        image_url(image_id), params={"redirect": "true"}, follow_redirects=False
    )
    assert redirect.status_code == 307
    assert cloud_api.fetch(redirect.headers["location"]).content == data


def test_store_unreachable_or_object_missing_serves_local_bytes(
    cloud_api: ApiHarness, make_api: Callable[..., ApiHarness]
) -> None:
    data = image_bytes("PNG")
    reply = upload(cloud_api, data)
    assert cloud_api.s3 is not None
    bucket = cloud_api.settings.storage_bucket
    # Another replica on the same disk, whose S3 endpoint is down.
    down = make_api(
        "local",
        storage_backend="s3",
        storage_bucket=bucket,
        aws_endpoint_url="http://127.0.0.1:9",
        serve_from_cloud=True,
        output_dir=cloud_api.settings.output_dir,
    )
    served = down.client.get(image_url(reply["id"]))
    assert served.status_code == 200
    assert served.content == data
    # A replica that can reach S3, where the object has gone: the local copy is served.
    cloud_api.s3.delete_object(Bucket=bucket, Key=reply["path"])
    fresh = make_api(
        "s3", storage_bucket=bucket, serve_from_cloud=True, output_dir=cloud_api.settings.output_dir
    )
    served = fresh.client.get(image_url(reply["id"]))
    assert served.status_code == 200
    assert served.content == data


def test_s3_mode_fetches_a_missing_local_copy_from_s3(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api("s3")
    data = image_bytes("WEBP")
    reply = upload(api, data, "me.webp")
    (api.settings.output_dir / reply["path"]).unlink()
    served = api.client.get(image_url(reply["id"]))
    assert served.status_code == 200
    assert served.content == data
    assert (api.settings.output_dir / reply["path"]).read_bytes() == data


def test_unknown_image_is_a_404_with_the_error_shape(api: ApiHarness) -> None:
    missing = str(uuid.uuid4())
    for path in (image_url(missing), f"/api/mv/character_references/{missing}/metadata"):
        reply = api.client.get(path)
        assert reply.status_code == 404
        assert reply.json()["detail"]["error"] == "NotFound"
        assert missing in reply.json()["detail"]["message"]


@pytest.mark.parametrize(
    "image_id",
    [
        "not-a-uuid",
        "123",
        "%2e%2e",
        "x" * 300,
        f"{uuid.uuid4()}.png",
        f"{uuid.uuid4()}%00",
        "%C3%A9",
    ],
)
def test_bad_ids_are_a_422_naming_the_image_id(
    make_api: Callable[..., ApiHarness], image_id: str
) -> None:
    api = make_api()
    for path in (
        f"/api/mv/get_character_reference/{image_id}",
        f"/api/mv/character_references/{image_id}/metadata",
    ):
        reply = api.client.get(path)
        assert reply.status_code == 422, (path, reply.status_code)
        assert reply.json()["detail"]["fields"][0]["loc"] == ["path", "image_id"]


# ---------------------------------------------------------------------- uploads


@pytest.mark.parametrize(
    ("image_format", "content_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")],
)
def test_upload_stores_a_real_image_like_a_generated_one(
    api: ApiHarness, image_format: str, content_type: str
) -> None:
    data = image_bytes(image_format, (80, 60))
    reply = upload(api, data, "anything.bin")
    assert reply["content_type"] == content_type
    assert (reply["width"], reply["height"], reply["size"]) == (80, 60, len(data))
    assert reply["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.fetch(reply["url"]).content == data
    sidecar = api.client.get(f"/api/mv/character_references/{reply['id']}/metadata").json()
    assert sidecar["backend"] == "upload"


def test_upload_keeps_the_description(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    reply = api.client.post(
        UPLOAD,
        files={"file": ("a.png", image_bytes(), "image/png")},
        data={"character_description": "me, drawn"},
    )
    image_id = reply.json()["id"]
    sidecar = api.client.get(f"/api/mv/character_references/{image_id}/metadata").json()
    assert sidecar["description"] == "me, drawn"


def test_upload_over_10_mb_is_refused_before_reading_it(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api()
    big = b"\x89PNG" + bytes(11 * 1024 * 1024)
    reply = api.client.post(UPLOAD, files={"file": ("big.png", big, "image/png")})
    assert reply.status_code == 413
    assert reply.json()["detail"]["error"] == "TooLarge"
    assert stored_files(api) == []


def test_upload_over_10_mb_without_content_length_is_refused(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api()
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(11):
            yield bytes(1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = api.client.post(
        UPLOAD,
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert reply.status_code == 413
    assert stored_files(api) == []


def test_upload_of_exactly_10_mb_is_judged_on_content(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    data = b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024 - 8)
    reply = api.client.post(UPLOAD, files={"file": ("a.png", data, "image/png")})
    assert reply.status_code == 415  # within the size limit, refused only as a bad image


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not an image",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        image_bytes("PNG", (200, 200))[:300],
        image_bytes("GIF"),
    ],
)
def test_upload_of_a_non_image_is_a_415(make_api: Callable[..., ApiHarness], data: bytes) -> None:
    api = make_api()
    reply = api.client.post(UPLOAD, files={"file": ("x.png", data, "image/png")})
    assert reply.status_code == 415
    assert reply.json()["detail"]["error"] == "UnsupportedImage"
    assert stored_files(api) == []


def test_upload_of_a_decompression_bomb_is_a_415(
    make_api: Callable[..., ApiHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    api = make_api()
    # Pillow refuses images over twice this many pixels; 200x200 stands in for a real bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    reply = api.client.post(UPLOAD, files={"file": ("x.png", image_bytes("PNG", (200, 200)))})
    assert reply.status_code == 415
    assert "too many pixels" in reply.json()["detail"]["message"]
    assert stored_files(api) == []


def test_upload_without_a_file_is_a_422_naming_it(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    reply = api.client.post(UPLOAD, data={"character_description": "x"})
    assert reply.status_code == 422
    assert reply.json()["detail"]["fields"][0]["loc"] == ["body", "file"]
    long = api.client.post(
        UPLOAD,
        files={"file": ("a.png", image_bytes(), "image/png")},
        data={"character_description": "x" * 2001},
    )
    assert long.status_code == 422
    assert long.json()["detail"]["fields"][0]["loc"] == ["body", "character_description"]


# ----------------------------------------------------------------------- config


def test_config_debug_shows_settings_and_never_secrets(make_api: Callable[..., ApiHarness]) -> None:
    from fake_replicate import FakeReplicate

    api = make_api(
        "s3",
        replicate=FakeReplicate(),
        replicate_api_token="r8_very-secret-token",
        serve_from_cloud=True,
        debug_endpoints=True,
        webhook_secret=WEBHOOK_SECRET,
    )
    reply = api.client.get("/api/mv/config/debug")
    assert reply.status_code == 200
    body = reply.json()
    assert body["storage_backend"] == "s3"
    assert body["storage_bucket"] == api.settings.storage_bucket
    assert body["serve_from_cloud"] is True
    assert body["presigned_url_expiry"] == api.settings.presigned_url_expiry
    assert body["image_generator"] == "auto"
    assert body["replicate_configured"] is True
    assert set(body["generation"]["generators"]) == {"local", "replicate"}
    assert body["webhooks_enabled"] is True
    for secret in ("r8_very-secret-token", "testing", WEBHOOK_SECRET):
        assert secret not in reply.text


def test_config_debug_is_absent_unless_enabled(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    assert api.client.get("/api/mv/config/debug").status_code == 404


def signing_time(presigned_url: str) -> float:
    """When a SigV4 presigned URL was signed (its X-Amz-Date), in seconds since the epoch."""
    stamp = parse_qs(urlsplit(presigned_url).query)["X-Amz-Date"][0]
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


def test_a_redirect_repeats_its_url_while_most_of_its_validity_is_left(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api("s3", serve_from_cloud=True, presigned_url_expiry=10)
    delivery = api.client.app.state.assets.delivery
    image_id = upload(api, image_bytes())["id"]
    path = f"/api/mv/get_character_reference/{image_id}?redirect=true"
    first = api.client.get(path, follow_redirects=False).headers["location"]
    signed_at = signing_time(first)
    # The server's clock stopped where 9.5 s of the 10 s are left: the requests below may take
    # as long as the machine needs.
    delivery.clock = lambda: signed_at + 0.5
    again = api.client.get(path, follow_redirects=False).headers["location"]
    assert again == first  # the same URL: browsers and CDNs can cache the image
    assert api.client.get(f"/api/mv/get_character_reference/{image_id}").json()["image_url"] == (
        first
    )
    delivery.clock = lambda: signed_at + 1.5  # now under 90 % of the 10 s validity is left
    # A URL signed within the same second would be the same URL: let that second pass.
    time.sleep(max(0.0, signed_at + 1 - time.time()))
    fresh = api.client.get(path, follow_redirects=False).headers["location"]
    assert fresh != first
    assert httpx.get(fresh).status_code == 200


def test_an_image_stored_after_a_miss_is_found(
    make_api: Callable[..., ApiHarness], write_image: Callable[..., Path]
) -> None:
    api = make_api()
    image_id = str(uuid.uuid4())
    assert api.client.get(image_url(image_id)).status_code == 404
    assets = api.client.app.state.assets
    api.client.portal.call(assets.persist_character_reference, image_id, write_image())
    assert api.client.get(image_url(image_id)).status_code == 200  # the miss was not remembered

"""Thumbnails: WebP, at most 256/512 px, made once, stored next to the original, cached."""

from __future__ import annotations

import asyncio
import io
import struct
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

import services.asset_persistence.thumbnails as thumbnails_module
from conftest import ApiHarness, assert_error_shape, photo_like_png
from routers.mv import ThumbnailSize
from services.asset_persistence import ThumbnailStore, UnsupportedImageError, render_thumbnail
from services.storage.keys import THUMBNAIL_SIZES, character_reference_key, thumbnail_key
from services.storage.local import LocalStorageBackend


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims `width` x `height` pixels (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


ORIGINAL = photo_like_png()


def _upload(api: ApiHarness) -> dict[str, str]:
    reply = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", ORIGINAL)}
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def _webp_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return image.size


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_thumbnails_are_small_webps_stored_next_to_the_original(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = make_api(mode)
    image = _upload(api)
    assert image["thumbnail_url"].endswith(f"/character_references/{image['id']}/thumbnail/256")
    small = api.client.get(image["thumbnail_url"])
    assert small.status_code == 200
    assert small.headers["content-type"] == "image/webp"
    assert _webp_size(small.content) == (256, 192)
    assert len(small.content) * 20 < len(ORIGINAL)
    assert "immutable" in small.headers["cache-control"]
    assert small.headers["x-content-type-options"] == "nosniff"
    etag = small.headers["etag"]
    again = api.client.get(image["thumbnail_url"], headers={"If-None-Match": etag})
    assert again.status_code == 304
    large = api.client.get(image["thumbnail_url"].replace("/256", "/512"))
    assert _webp_size(large.content) == (512, 384)
    assert large.headers["etag"] != etag
    key = thumbnail_key(image["path"], 256)
    assert key == f"character_references/{image['id']}.thumb256.webp"
    assert (api.settings.output_dir / key).read_bytes() == small.content
    if api.s3 is not None:
        stored = api.s3.get_object(Bucket=api.settings.storage_bucket, Key=key)
        assert stored["Body"].read() == small.content
        assert stored["ContentType"] == "image/webp"


def test_other_sizes_are_a_422_naming_the_size(make_api: Callable[..., ApiHarness]) -> None:
    assert [size.value for size in ThumbnailSize] == list(THUMBNAIL_SIZES)
    api = make_api()
    image = _upload(api)
    reply = api.client.get(f"/api/mv/character_references/{image['id']}/thumbnail/300")
    assert reply.status_code == 422
    assert assert_error_shape(reply.json())["fields"][0]["loc"] == ["path", "size"]
    missing = api.client.get(f"/api/mv/character_references/{uuid.uuid4()}/thumbnail/256")
    assert missing.status_code == 404


def test_cloud_serving_redirects_to_the_presigned_thumbnail(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api("s3", serve_from_cloud=True)
    image = _upload(api)
    reply = api.client.get(image["thumbnail_url"], follow_redirects=False)
    assert reply.status_code == 307
    presigned = reply.headers["location"]
    assert "X-Amz-Signature" in presigned
    fetched = httpx.get(presigned)
    assert fetched.status_code == 200
    assert _webp_size(fetched.content) == (256, 192)


def test_job_copies_have_thumbnails_too(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    image = _upload(api)
    assert api.client.post("/api/mv/jobs", json={"job_id": "thumbs"}).status_code == 201
    job = api.client.post(
        "/api/mv/jobs/thumbs/character_references", json={"image_ids": [image["id"]]}
    ).json()
    (asset,) = job["assets"]
    expected = f"/api/mv/jobs/thumbs/character_references/{image['id']}/thumbnail/256"
    assert asset["thumbnail_url"] == expected
    reply = api.client.get(asset["thumbnail_url"])
    assert reply.status_code == 200
    assert _webp_size(reply.content) == (256, 192)
    assert (
        api.settings.output_dir / f"jobs/thumbs/character_reference/{image['id']}.thumb256.webp"
    ).exists()


def test_concurrent_first_requests_render_one_thumbnail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorageBackend(tmp_path)
    key = character_reference_key(str(uuid.uuid4()), "png")
    storage.put_bytes(key, ORIGINAL, "image/png")
    renders = []

    def counting_render(data: bytes, size: int) -> bytes:
        renders.append(size)
        return render_thumbnail(data, size)

    monkeypatch.setattr(thumbnails_module, "render_thumbnail", counting_render)

    async def hundred_requests() -> set[str]:
        store = ThumbnailStore(storage)
        return set(await asyncio.gather(*(store.ensure(key, 256) for _ in range(100))))

    keys = asyncio.run(hundred_requests())
    assert keys == {thumbnail_key(key, 256)}
    assert renders == [256]
    # A new store (another replica, a restart) finds the stored thumbnail: no new rendering.
    asyncio.run(ThumbnailStore(storage).ensure(key, 256))
    assert renders == [256]


@pytest.mark.parametrize(
    ("stored", "why"),
    [(png_claiming(40_000, 40_000), "too many pixels"), (b"not an image at all", "not a PNG")],
)
def test_a_bomb_or_a_non_image_never_gets_a_thumbnail(
    make_api: Callable[..., ApiHarness], stored: bytes, why: str
) -> None:
    with pytest.raises(UnsupportedImageError, match=why):
        render_thumbnail(stored, 256)
    api = make_api()
    image_id = str(uuid.uuid4())
    key = character_reference_key(image_id, "png")
    LocalStorageBackend(api.settings.output_dir).put_bytes(key, stored, "image/png")
    reply = api.client.get(f"/api/mv/character_references/{image_id}/thumbnail/256")
    assert reply.status_code == 415
    assert why in assert_error_shape(reply.json(), "UnsupportedImage")["message"]
    assert not (api.settings.output_dir / thumbnail_key(key, 256)).exists()

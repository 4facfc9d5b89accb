"""Deleting images and jobs: every tier, 204 then 404, safe to repeat and to race."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from conftest import (
    S3_STORAGE_MODES,
    ApiHarness,
    StorageHarness,
    assert_error_shape,
    photo_like_png,
)
from live_server import serve
from main import create_app
from routers.serving import file_response
from services.asset_persistence import LocalImageFile
from services.storage.keys import character_reference_key

ORIGINAL = photo_like_png(512, 384)


def _stored_keys(api: ApiHarness, prefix: str) -> set[str]:
    """Keys under `prefix` in the local tier and, in S3 mode, in the bucket."""
    root = api.settings.output_dir
    keys = {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}
    keys = {key for key in keys if key.startswith(prefix)}
    if api.s3 is not None:
        listed = api.s3.list_objects_v2(Bucket=api.settings.storage_bucket, Prefix=prefix)
        keys |= {item["Key"] for item in listed.get("Contents", [])}
    return keys


def _upload(api: ApiHarness) -> dict[str, Any]:
    reply = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", ORIGINAL)}
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_deleting_a_candidate_removes_it_everywhere_but_the_job_copy_stays(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = make_api(mode)
    image, other = _upload(api), _upload(api)
    image_id = image["id"]
    assert api.client.get(image["thumbnail_url"]).status_code == 200  # a thumbnail exists
    assert api.client.post("/api/mv/jobs", json={"job_id": "keeps"}).status_code == 201
    job = api.client.post(
        "/api/mv/jobs/keeps/character_references", json={"image_ids": [image_id]}
    ).json()
    prefix = f"character_references/{image_id}"
    assert len(_stored_keys(api, prefix)) == 3  # image, sidecar, thumbnail

    deleted = api.client.delete(f"/api/mv/character_references/{image_id}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    for path in (
        f"/api/mv/get_character_reference/{image_id}",
        f"/api/mv/character_references/{image_id}/metadata",
        f"/api/mv/character_references/{image_id}/thumbnail/256",
    ):
        reply = api.client.get(path)
        assert reply.status_code == 404, path
        assert_error_shape(reply.json(), "NotFound")
    assert _stored_keys(api, prefix) == set()
    again = api.client.delete(f"/api/mv/character_references/{image_id}")
    assert again.status_code == 404
    assert_error_shape(again.json(), "NotFound")
    # Jobs own their files; other images are untouched.
    (asset,) = job["assets"]
    assert api.fetch(api.client.get("/api/mv/jobs/keeps").json()["assets"][0]["url"]).content
    assert api.client.get(asset["thumbnail_url"]).status_code == 200
    assert api.client.get(f"/api/mv/get_character_reference/{other['id']}").status_code == 200


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_deleting_a_job_removes_its_files_manifest_and_record(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = make_api(mode)
    image = _upload(api)
    assert api.client.post("/api/mv/jobs", json={"job_id": "doomed"}).status_code == 201
    job = api.client.post(
        "/api/mv/jobs/doomed/character_references", json={"image_ids": [image["id"]]}
    ).json()
    assert api.client.get(job["assets"][0]["thumbnail_url"]).status_code == 200
    assert len(_stored_keys(api, "jobs/doomed/")) == 3  # copy, its thumbnail, manifest

    assert api.client.delete("/api/mv/jobs/doomed").status_code == 204
    assert api.client.get("/api/mv/jobs/doomed").status_code == 404
    assert api.client.get(job["assets"][0]["url"].partition("?")[0]).status_code == 404
    assert _stored_keys(api, "jobs/doomed/") == set()
    assert _stored_keys(api, "job_records/doomed") == set()
    assert api.client.delete("/api/mv/jobs/doomed").status_code == 404
    # The standalone candidate stays; the id can be used again.
    assert api.client.get(f"/api/mv/get_character_reference/{image['id']}").status_code == 200
    assert api.client.post("/api/mv/jobs", json={"job_id": "doomed"}).status_code == 201


def test_readers_racing_a_delete_get_the_whole_file_or_a_404(
    make_settings: Callable[..., Any], tiny_sdxl_turbo: Path
) -> None:
    app = create_app(make_settings(local_model_id=str(tiny_sdxl_turbo), local_device="cpu"))
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(5):
            image = client.post(
                "/api/mv/upload_character_reference", files={"file": ("a.png", ORIGINAL)}
            ).json()
            started = threading.Barrier(9)

            def read(image: dict[str, Any] = image, started: threading.Barrier = started) -> Any:
                started.wait()
                return [client.get(image["url"]) for _ in range(10)]

            def delete(image: dict[str, Any] = image, started: threading.Barrier = started) -> Any:
                started.wait()
                return client.delete(f"/api/mv/character_references/{image['id']}")

            with ThreadPoolExecutor(9) as pool:
                readers = [pool.submit(read) for _ in range(8)]
                deleter = pool.submit(delete)
                replies = [reply for reader in readers for reply in reader.result()]
            assert deleter.result().status_code == 204
            statuses = {reply.status_code for reply in replies}
            assert statuses <= {200, 404}, statuses
            assert all(r.content == ORIGINAL for r in replies if r.status_code == 200)
            assert client.get(image["url"]).status_code == 404


def test_a_file_deleted_after_it_was_opened_is_still_served_whole(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    app = FastAPI()

    @app.get("/file")
    async def serve_then_delete(request: Request) -> Response:
        path.write_bytes(ORIGINAL)
        located = LocalImageFile("k", path, "image/png", None)
        response = await file_response(request, located, "no-cache")
        path.unlink()  # deleted between the open and the first byte sent
        return response

    with TestClient(app) as client:
        reply = client.get("/file")
        assert reply.status_code == 200
        assert reply.content == ORIGINAL
        ranged = client.get("/file", headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206
        assert ranged.content == ORIGINAL[10:20]


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)  # tiers that hold uploads
def test_a_pending_upload_never_brings_a_deleted_key_back(storage: StorageHarness) -> None:
    backend: Any = storage.backend
    key = character_reference_key("3f0c2a52-3c1b-4c55-9d44-0d2c6f7a9e11", "png")
    backend.hold(key, ORIGINAL, "image/png")  # S3 was unreachable when it was written
    backend.delete(key)
    assert backend.retry_pending() == []
    assert not backend.exists(key)
    assert "Contents" not in storage.s3.list_objects_v2(
        Bucket=storage.settings.storage_bucket, Prefix=key
    )

    # A delete landing while the retry is uploading: the delete still wins.
    backend.hold(key, ORIGINAL, "image/png")
    upload = backend.remote.put_file

    def upload_then_delete(*args: Any, **kwargs: Any) -> Any:
        stored = upload(*args, **kwargs)
        backend.delete(key)
        return stored

    backend.remote.put_file = upload_then_delete
    backend.retry_pending()
    assert not backend.exists(key)
    assert backend.local_copy(key) is None


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)
def test_a_fetch_overtaken_by_a_delete_leaves_no_local_copy(storage: StorageHarness) -> None:
    backend: Any = storage.backend
    key = character_reference_key("4a0c2a52-3c1b-4c55-9d44-0d2c6f7a9e11", "png")
    storage.s3.put_object(Bucket=storage.settings.storage_bucket, Key=key, Body=ORIGINAL)
    fetch_bytes, fetch_file = backend.remote.get_bytes, backend.remote.download

    def fetch_then_deleted(fetch: Callable[..., Any]) -> Callable[..., Any]:
        def fetch_while_deleting(*args: Any, **kwargs: Any) -> Any:
            fetched = fetch(*args, **kwargs)
            backend.delete(key)  # lands while the fetched bytes are on their way to the cache
            return fetched

        return fetch_while_deleting

    backend.remote.download = fetch_then_deleted(fetch_file)
    assert backend.local_copy(key) is None
    assert not backend.local.exists(key)

    storage.s3.put_object(Bucket=storage.settings.storage_bucket, Key=key, Body=ORIGINAL)
    backend.remote.get_bytes = fetch_then_deleted(fetch_bytes)
    assert backend.get_bytes(key) == ORIGINAL  # the reader that asked first still gets it
    assert not backend.local.exists(key)
    assert not backend.exists(key)

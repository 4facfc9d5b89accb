"""Ownership: images and generations belong to the principal that made them. Anyone else
gets a 404, exactly as for an id that does not exist; operators see everything; a signed URL
stays a capability; Idempotency-Keys are per owner; records with no owner are operators' only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from config import get_settings
from conftest import ApiHarness, BlockingGenerator, assert_error_shape, image_bytes, wait_until
from services.asset_persistence import AssetPersistenceService
from tools import assign_owner, index_lists

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
OPERATOR = "operator-key-0123456789abcdef"
GENERATE = "/api/mv/generate_character_reference"
JOBS = "/api/mv/character_reference_jobs"
BODY = {"character_description": "a silver robot", "num_images": 1, "seed": 5}


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def owners_api(
    make_api: Callable[..., ApiHarness], mode: str = "local", **overrides: Any
) -> ApiHarness:
    """Alice, Bob and an operator, on a generator that finishes at once."""
    blocking = BlockingGenerator()
    blocking.release.set()
    return make_api(
        mode,
        generators={"replicate": blocking},
        image_generator="replicate",
        api_keys=f"alice:{ALICE},bob:{BOB}",
        admin_api_keys=f"ops:{OPERATOR}",
        **overrides,
    )


def upload(api: ApiHarness, key: str) -> dict[str, Any]:
    reply = api.client.post(
        "/api/mv/upload_character_reference",
        files={"file": ("a.png", image_bytes())},
        headers=as_(key),
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def assert_not_found_like_a_missing_id(reply: Any, image_id: str, missing: Any, other: str) -> None:
    """`reply` (for `image_id`) is the 404 an id that does not exist (`other`) gets."""
    assert reply.status_code == missing.status_code == 404
    assert_error_shape(reply.json(), "NotFound")
    assert reply.json()["detail"]["message"] == missing.json()["detail"]["message"].replace(
        other, image_id
    )


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [("local", {}), ("s3", {"serve_from_cloud": True})],
    ids=["local", "cloud serving"],
)
def test_an_image_is_its_owners_alone(
    make_api: Callable[..., ApiHarness], mode: str, overrides: dict[str, Any]
) -> None:
    api = owners_api(make_api, mode, **overrides)
    image_id = upload(api, ALICE)["id"]
    other = str(uuid.uuid4())
    paths = [
        "/api/mv/get_character_reference/{}",
        "/api/mv/get_character_reference/{}?redirect=true",
        "/api/mv/character_references/{}/thumbnail/256",
        "/api/mv/character_references/{}/metadata",
    ]
    cloud = "serve_from_cloud" in overrides
    for path in paths:
        served = 307 if cloud and ("redirect" in path or "thumbnail" in path) else 200

        def get(image: str, key: str, path: str = path) -> Any:
            return api.client.get(path.format(image), headers=as_(key), follow_redirects=False)

        # Alice first: in cloud serving that puts the image's URL in the replica's memory.
        assert get(image_id, ALICE).status_code == served
        assert_not_found_like_a_missing_id(get(image_id, BOB), image_id, get(other, BOB), other)
        assert get(image_id, OPERATOR).status_code == served
        assert get(image_id, ALICE).status_code == served
    assert (
        api.client.get(
            f"/api/mv/character_references/{image_id}/metadata", headers=as_(ALICE)
        ).json()["owner"]
        == "alice"
    )
    refused = api.client.delete(f"/api/mv/character_references/{image_id}", headers=as_(BOB))
    assert_not_found_like_a_missing_id(
        refused,
        image_id,
        api.client.delete(f"/api/mv/character_references/{other}", headers=as_(BOB)),
        other,
    )
    assert (
        api.client.get(
            f"/api/mv/character_references/{image_id}/metadata", headers=as_(ALICE)
        ).status_code
        == 200
    )
    deleted = api.client.delete(f"/api/mv/character_references/{image_id}", headers=as_(OPERATOR))
    assert deleted.status_code == 204


def test_another_owners_image_cannot_be_used_as_a_reference_or_attached(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = owners_api(make_api)
    image_id = upload(api, ALICE)["id"]
    body = {**BODY, "reference_image_ids": [image_id]}
    for path in (GENERATE, JOBS):
        reply = api.client.post(path, json=body, headers=as_(BOB))
        assert reply.status_code == 404
        assert image_id in assert_error_shape(reply.json(), "NotFound")["message"]
    assert api.client.post(GENERATE, json=body, headers=as_(ALICE)).status_code == 200
    assert (
        api.client.post("/api/mv/jobs", json={"job_id": "bobs"}, headers=as_(BOB)).status_code
        == 201
    )
    attach = api.client.post(
        "/api/mv/jobs/bobs/character_references", json={"image_ids": [image_id]}, headers=as_(BOB)
    )
    assert attach.status_code == 404
    assert (
        api.client.get("/api/mv/jobs/bobs", headers=as_(BOB)).json()["character_references"] == []
    )


def test_images_a_generation_makes_are_its_owners(make_api: Callable[..., ApiHarness]) -> None:
    api = owners_api(make_api)
    made = api.client.post(GENERATE, json=BODY, headers=as_(ALICE)).json()["images"][0]["id"]
    metadata = f"/api/mv/character_references/{made}/metadata"
    assert api.client.get(metadata, headers=as_(ALICE)).json()["owner"] == "alice"
    assert api.client.get(metadata, headers=as_(BOB)).status_code == 404


def test_a_generation_is_its_owners_alone(make_api: Callable[..., ApiHarness]) -> None:
    blocking = BlockingGenerator()  # held: it is still running when Bob tries to cancel it
    api = make_api(
        generators={"replicate": blocking},
        image_generator="replicate",
        api_keys=f"alice:{ALICE},bob:{BOB}",
        admin_api_keys=f"ops:{OPERATOR}",
    )
    submitted = api.client.post(JOBS, json=BODY, headers=as_(ALICE))
    assert submitted.status_code == 202
    status_url = submitted.json()["status_url"]
    other = f"{JOBS}/{uuid.uuid4()}"
    for method in ("GET", "DELETE"):
        reply = api.client.request(method, status_url, headers=as_(BOB))
        missing = api.client.request(method, other, headers=as_(BOB))
        assert reply.status_code == missing.status_code == 404
        assert_error_shape(reply.json(), "NotFound")
    assert api.client.get(status_url, headers=as_(ALICE)).json()["status"] in ("queued", "running")
    assert api.client.get(status_url, headers=as_(OPERATOR)).status_code == 200
    canceled = api.client.delete(status_url, headers=as_(ALICE))
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"


def test_idempotency_keys_are_per_owner(make_api: Callable[..., ApiHarness]) -> None:
    api = owners_api(make_api)
    key = {"Idempotency-Key": "same-key-1"}
    first = api.client.post(JOBS, json=BODY, headers={**as_(ALICE), **key}).json()
    again = api.client.post(JOBS, json=BODY, headers={**as_(ALICE), **key}).json()
    bobs = api.client.post(JOBS, json=BODY, headers={**as_(BOB), **key}).json()
    assert again["generation_id"] == first["generation_id"]
    assert bobs["generation_id"] != first["generation_id"]
    assert api.client.get(bobs["status_url"], headers=as_(BOB)).status_code == 200
    job = {"metadata": {"title": "video"}}
    alices_job = api.client.post("/api/mv/jobs", json=job, headers={**as_(ALICE), **key})
    bobs_job = api.client.post("/api/mv/jobs", json=job, headers={**as_(BOB), **key})
    assert alices_job.status_code == bobs_job.status_code == 201
    assert alices_job.json()["job_id"] != bobs_job.json()["job_id"]


def test_a_signed_url_is_a_capability_whoever_holds_it(make_api: Callable[..., ApiHarness]) -> None:
    api = owners_api(make_api)
    uploaded = upload(api, ALICE)
    assert "signature=" in uploaded["url"]
    assert api.client.get(uploaded["url"]).status_code == 200  # no key at all
    assert api.client.get(uploaded["thumbnail_url"]).status_code == 200


def test_records_from_before_owners_are_operators_only(make_api: Callable[..., ApiHarness]) -> None:
    api = owners_api(make_api)
    legacy = AssetPersistenceService(api.client.app.state.assets.storage, settings=api.settings)
    stored = asyncio.run(legacy.store_character_reference(str(uuid.uuid4()), image_bytes()))
    path = f"/api/mv/character_references/{stored.id}/metadata"
    assert api.client.get(path, headers=as_(ALICE)).status_code == 404
    reply = api.client.get(path, headers=as_(OPERATOR))
    assert reply.status_code == 200
    assert reply.json()["owner"] is None


def test_a_job_is_its_owners_alone(make_api: Callable[..., ApiHarness]) -> None:
    api = owners_api(make_api)
    image_id = upload(api, ALICE)["id"]
    assert (
        api.client.post("/api/mv/jobs", json={"job_id": "alices"}, headers=as_(ALICE)).status_code
        == 201
    )
    attached = api.client.post(
        "/api/mv/jobs/alices/character_references",
        json={"image_ids": [image_id]},
        headers=as_(ALICE),
    )
    assert attached.status_code == 200
    asset = attached.json()["character_references"][0]["path"]
    reads = [
        "/api/mv/jobs/{}",
        "/api/mv/jobs/{}/character_references/" + image_id,
        "/api/mv/jobs/{}/character_references/" + image_id + "/thumbnail/256",
        "/api/mv/jobs/{}/assets/" + asset,
    ]
    for path in reads:
        assert api.client.get(path.format("alices"), headers=as_(ALICE)).status_code == 200
        reply = api.client.get(path.format("alices"), headers=as_(BOB))
        missing = api.client.get(path.format("nobodys"), headers=as_(BOB))
        assert reply.status_code == missing.status_code == 404, path
        assert reply.json() == _renamed(missing.json(), "nobodys", "alices"), path
        assert api.client.get(path.format("alices"), headers=as_(OPERATOR)).status_code == 200
    attach = api.client.post(
        "/api/mv/jobs/alices/character_references",
        json={"image_ids": [upload(api, BOB)["id"]]},
        headers=as_(BOB),
    )
    assert attach.status_code == 404
    generate = api.client.post(GENERATE, json={**BODY, "job_id": "alices"}, headers=as_(BOB))
    assert generate.status_code == 404
    assert "alices" in assert_error_shape(generate.json(), "NotFound")["message"]
    assert api.client.delete("/api/mv/jobs/alices", headers=as_(BOB)).status_code == 404
    assert api.client.get("/api/mv/jobs/alices", headers=as_(ALICE)).json()["job_id"] == "alices"
    assert api.client.delete("/api/mv/jobs/alices", headers=as_(ALICE)).status_code == 204


def test_a_job_a_worker_persisted_without_a_record_is_operators_only(
    make_api: Callable[..., ApiHarness], tmp_path: Any
) -> None:
    api = owners_api(make_api)
    directory = tmp_path / "job"
    (directory / "audio").mkdir(parents=True)
    (directory / "audio" / "song.txt").write_text("la la")
    worker = AssetPersistenceService(api.client.app.state.assets.storage, settings=api.settings)
    asyncio.run(worker.persist_job_assets("from-a-worker", directory))
    assert api.client.get("/api/mv/jobs/from-a-worker", headers=as_(ALICE)).status_code == 404
    assert api.client.get("/api/mv/jobs/from-a-worker", headers=as_(OPERATOR)).status_code == 200


def _renamed(body: Any, old: str, new: str) -> Any:
    """`body` with `old` replaced by `new` in its message (the id it names)."""
    detail = body["detail"]
    return {"detail": {**detail, "message": detail["message"].replace(old, new)}}


def test_the_assign_command_gives_what_has_no_owner_to_one(
    make_api: Callable[..., ApiHarness],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    api = owners_api(make_api)
    storage = api.client.app.state.assets.storage
    legacy = AssetPersistenceService(storage, settings=api.settings)
    ownerless = asyncio.run(legacy.store_character_reference(str(uuid.uuid4()), image_bytes()))
    (tmp_path / "job" / "audio").mkdir(parents=True)
    (tmp_path / "job" / "audio" / "song.txt").write_text("la la")
    asyncio.run(legacy.persist_job_assets("from-a-worker", tmp_path / "job"))
    alices = upload(api, ALICE)["id"]
    metadata = "/api/mv/character_references/{}/metadata"
    monkeypatch.setenv("STORAGE_BACKEND", "local")
    monkeypatch.setenv("OUTPUT_DIR", str(api.settings.output_dir))
    get_settings.cache_clear()
    try:
        assert assign_owner.main(["bob"]) == 0  # lists, changes nothing
        listed = capsys.readouterr().out
        assert ownerless.id in listed and "jobs/from-a-worker/manifest.json" in listed
        assert alices not in listed
        assert "2 without an owner" in listed
        assert api.client.get(metadata.format(ownerless.id), headers=as_(BOB)).status_code == 404
        assert assign_owner.main(["bob", "--apply"]) == 0
        assert "2 without an owner; assigned to bob" in capsys.readouterr().out
        assert assign_owner.main(["bob"]) == 0
        assert "0 without an owner" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
    record = api.client.get(metadata.format(ownerless.id), headers=as_(BOB))
    assert record.status_code == 200
    assert record.json()["owner"] == "bob"
    assert api.client.get("/api/mv/jobs/from-a-worker", headers=as_(BOB)).status_code == 200
    assert api.client.get("/api/mv/jobs/from-a-worker", headers=as_(ALICE)).status_code == 404
    assert api.client.get(metadata.format(alices), headers=as_(ALICE)).json()["owner"] == "alice"
    # Given to Bob, they are in his lists, and no longer in the list of what has no owner.
    bobs_images = api.client.get("/api/mv/character_references", headers=as_(BOB)).json()
    assert [item["id"] for item in bobs_images["items"]] == [ownerless.id]
    bobs_jobs = api.client.get("/api/mv/jobs", headers=as_(BOB)).json()
    assert [item["job_id"] for item in bobs_jobs["items"]] == ["from-a-worker"]
    assert storage.list_keys("character_references/index/unowned/") == []


def test_the_index_command_lists_what_was_stored_before_lists_existed(
    make_api: Callable[..., ApiHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = owners_api(make_api)
    image_id = upload(api, ALICE)["id"]
    job_id = api.client.post("/api/mv/jobs", json={}, headers=as_(ALICE)).json()["job_id"]
    generation = api.client.post(JOBS, json=BODY, headers=as_(ALICE)).json()["generation_id"]
    storage = api.client.app.state.assets.storage
    wait_until(
        lambda: (
            api.client.get(f"{JOBS}/{generation}", headers=as_(ALICE)).json()["status"]
            == "succeeded"
        )
    )
    lists = ("/api/mv/character_references", "/api/mv/jobs", JOBS)
    before = [api.client.get(path, headers=as_(ALICE)).json() for path in lists]
    for root in ("character_references/index/", "job_records/index/", "generations/index/"):
        for key in storage.list_keys(root):
            storage.delete(key)  # as a store written before lists existed
    assert all(api.client.get(path, headers=as_(ALICE)).json()["items"] == [] for path in lists)
    monkeypatch.setenv("STORAGE_BACKEND", "local")
    monkeypatch.setenv("OUTPUT_DIR", str(api.settings.output_dir))
    get_settings.cache_clear()
    try:
        assert index_lists.main([]) == 0
        assert index_lists.main([]) == 0  # safe to repeat
    finally:
        get_settings.cache_clear()
    after = [api.client.get(path, headers=as_(ALICE)).json() for path in lists]
    assert after == before
    assert image_id in {item["id"] for item in after[0]["items"]}
    assert [item["job_id"] for item in after[1]["items"]] == [job_id]

"""Lists: the caller's images, jobs and generations, newest first, paged by opaque cursors.

Each list reads an index kept in the store (in both storage modes), so these tests check the
index as much as the routes: entries appear when things are stored, go when they are deleted
or expire, belong to one owner, and page stably while others write.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ownership import ALICE, BOB, OPERATOR, as_, owners_api

from conftest import ApiHarness, BlockingGenerator, StorageHarness, assert_error_shape, image_bytes
from services.asset_persistence import (
    CANDIDATES_PREFIX,
    GenerationDetails,
    ListFilter,
    sweep_expired_candidates,
)
from services.asset_persistence.retention import candidate_rule
from services.owner_index import entry_name, item_id_of
from services.storage import LocalStorageBackend

IMAGES = "/api/mv/character_references"
JOBS = "/api/mv/jobs"
GENERATIONS = "/api/mv/character_reference_jobs"
UPLOAD = "/api/mv/upload_character_reference"
MODES = pytest.mark.parametrize("mode", ["local", "s3"])


def upload(api: ApiHarness, key: str, color: int = 0) -> str:
    reply = api.client.post(
        UPLOAD, files={"file": ("a.png", image_bytes(size=(8 + color, 8)))}, headers=as_(key)
    )
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def walk(api: ApiHarness, path: str, key: str, limit: int, **params: Any) -> list[list[str]]:
    """Every page of a list, following next_cursor; each page as its item ids."""
    pages: list[list[str]] = []
    cursor = None
    id_field = {IMAGES: "id", JOBS: "job_id", GENERATIONS: "generation_id"}[path]
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        reply = api.client.get(path, params=query, headers=as_(key))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        pages.append([item[id_field] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


@MODES
def test_images_are_listed_newest_first_in_pages_and_only_to_their_owner(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = owners_api(make_api, mode)
    alices = [upload(api, ALICE, index) for index in range(7)]
    bobs = [upload(api, BOB, index) for index in range(2)]

    pages = walk(api, IMAGES, ALICE, limit=3)
    assert pages == [alices[::-1][0:3], alices[::-1][3:6], alices[::-1][6:]]
    assert walk(api, IMAGES, BOB, limit=50) == [bobs[::-1]]

    first = api.client.get(IMAGES, params={"limit": 1}, headers=as_(ALICE)).json()["items"][0]
    metadata = api.client.get(f"{IMAGES}/{alices[-1]}/metadata", headers=as_(ALICE)).json()
    assert first["id"] == alices[-1]
    assert first["created_at"] == metadata["created_at"]
    assert (first["width"], first["height"], first["content_type"]) == (14, 8, "image/png")
    assert first["character_description"] is None and first["seed"] is None
    # The URLs work on their own (signed, or presigned in S3 mode).
    assert (
        api.fetch(first["url"]).content
        == api.client.get(
            f"/api/mv/get_character_reference/{alices[-1]}", headers=as_(ALICE)
        ).content
    )
    assert api.fetch(first["thumbnail_url"]).headers["content-type"] == "image/webp"


def test_generated_images_carry_their_description_seed_and_lineage(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = owners_api(make_api)
    identity = upload(api, ALICE)
    made = api.client.post(
        "/api/mv/generate_character_reference",
        json={
            "character_description": "a silver robot",
            "reference_image_ids": [identity],
            "views": ["front", "side"],
            "seed": 40,
        },
        headers=as_(ALICE),
    )
    assert made.status_code == 200, made.text
    made_ids = [image["id"] for image in made.json()["images"]]
    other = api.client.post(
        "/api/mv/generate_character_reference",
        json={"character_description": "a cat", "num_images": 1, "seed": 7},
        headers=as_(ALICE),
    )
    assert other.status_code == 200, other.text

    listed = api.client.get(IMAGES, params={"reference_image_id": identity}, headers=as_(ALICE))
    items = listed.json()["items"]
    assert {item["id"] for item in items} == set(made_ids)
    assert {item["view"] for item in items} == {"front", "side"}
    assert all(item["reference_image_ids"] == [identity] for item in items)
    assert all(item["character_description"] == "a silver robot" for item in items)
    assert sorted(item["seed"] for item in items) == [40, 41]
    everything = api.client.get(IMAGES, headers=as_(ALICE)).json()["items"]
    assert len(everything) == 4  # the upload, two views, the cat


def test_the_job_filter_lists_the_images_given_to_a_job(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = owners_api(make_api)
    job_id = api.client.post(JOBS, json={}, headers=as_(ALICE)).json()["job_id"]
    attached, _loose = upload(api, ALICE, 1), upload(api, ALICE, 2)
    reply = api.client.post(
        f"{JOBS}/{job_id}/character_references",
        json={"image_ids": [attached]},
        headers=as_(ALICE),
    )
    assert reply.status_code == 200, reply.text
    generated = api.client.post(
        "/api/mv/generate_character_reference",
        json={"character_description": "a fox", "num_images": 1, "job_id": job_id},
        headers=as_(ALICE),
    ).json()["images"][0]["id"]

    listed = api.client.get(IMAGES, params={"job_id": job_id}, headers=as_(ALICE)).json()
    assert [item["id"] for item in listed["items"]] == [generated, attached]
    # Bob's view of Alice's job is the 404 of a job that does not exist.
    refused = api.client.get(IMAGES, params={"job_id": job_id}, headers=as_(BOB))
    missing = api.client.get(IMAGES, params={"job_id": "no-such-job"}, headers=as_(BOB))
    assert refused.status_code == missing.status_code == 404
    assert_error_shape(refused.json(), "NotFound")
    both = api.client.get(
        IMAGES, params={"job_id": job_id, "reference_image_id": attached}, headers=as_(ALICE)
    )
    assert both.status_code == 422
    assert assert_error_shape(both.json(), "ValidationError")["fields"][0]["loc"] == [
        "query",
        "reference_image_id",
    ]
    # Deleting the image takes it out of the job's list too; the job keeps its copy.
    assert api.client.delete(f"{IMAGES}/{attached}", headers=as_(ALICE)).status_code == 204
    listed = api.client.get(IMAGES, params={"job_id": job_id}, headers=as_(ALICE)).json()
    assert [item["id"] for item in listed["items"]] == [generated]
    job = api.client.get(f"{JOBS}/{job_id}", headers=as_(ALICE)).json()
    assert attached in {asset["image_id"] for asset in job["character_references"]}


@MODES
def test_a_delete_takes_an_image_out_of_every_list_and_leaves_no_entry(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = owners_api(make_api, mode)
    job_id = api.client.post(JOBS, json={}, headers=as_(ALICE)).json()["job_id"]
    identity = upload(api, ALICE)
    made = api.client.post(
        "/api/mv/generate_character_reference",
        json={
            "character_description": "a robot",
            "reference_image_ids": [identity],
            "views": ["front"],
            "job_id": job_id,
        },
        headers=as_(ALICE),
    ).json()["images"][0]["id"]
    api.client.post(
        f"{JOBS}/{job_id}/character_references", json={"image_ids": [identity]}, headers=as_(ALICE)
    )
    storage = api.client.app.state.assets.storage
    for image_id in (made, identity):
        assert api.client.delete(f"{IMAGES}/{image_id}", headers=as_(ALICE)).status_code == 204
    assert storage.list_keys(CANDIDATES_PREFIX) == []
    for params in ({}, {"job_id": job_id}, {"reference_image_id": identity}):
        assert api.client.get(IMAGES, params=params, headers=as_(ALICE)).json()["items"] == []


def test_operators_list_anyones_and_owners_only_their_own(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = owners_api(make_api)
    alices = [upload(api, ALICE, index) for index in range(2)]
    job_id = api.client.post(JOBS, json={}, headers=as_(ALICE)).json()["job_id"]

    assert walk(api, IMAGES, OPERATOR, limit=10, owner="alice") == [alices[::-1]]
    assert walk(api, JOBS, OPERATOR, limit=10, owner="alice") == [[job_id]]
    assert walk(api, IMAGES, OPERATOR, limit=10) == [[]]  # the operator's own: none
    assert walk(api, IMAGES, ALICE, limit=10, owner="alice") == [alices[::-1]]
    for path in (IMAGES, JOBS, GENERATIONS):
        refused = api.client.get(path, params={"owner": "alice"}, headers=as_(BOB))
        assert refused.status_code == 422, path
        fields = assert_error_shape(refused.json(), "ValidationError")["fields"]
        assert fields[0]["loc"] == ["query", "owner"]
    unauthenticated = api.client.get(IMAGES)
    assert unauthenticated.status_code == 401


def test_bad_paging_parameters_are_a_422_naming_them(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = owners_api(make_api)
    for index in range(3):
        upload(api, ALICE, index)
        api.client.post(JOBS, json={}, headers=as_(ALICE))
    image_cursor = api.client.get(IMAGES, params={"limit": 1}, headers=as_(ALICE)).json()[
        "next_cursor"
    ]
    job_cursor = api.client.get(JOBS, params={"limit": 1}, headers=as_(ALICE)).json()["next_cursor"]
    assert image_cursor and job_cursor
    cases = [
        (IMAGES, {"limit": 0}, "limit"),
        (IMAGES, {"limit": 101}, "limit"),
        (JOBS, {"limit": "many"}, "limit"),
        (IMAGES, {"cursor": job_cursor}, "cursor"),  # another list's
        (JOBS, {"cursor": image_cursor}, "cursor"),
        (IMAGES, {"cursor": "not-a-cursor"}, "cursor"),
        (IMAGES, {"cursor": image_cursor[:-3]}, "cursor"),
        (IMAGES, {"cursor": "x" * 600}, "cursor"),
        (GENERATIONS, {"status": "finished"}, "status"),
        (IMAGES, {"reference_image_id": "nope"}, "reference_image_id"),
        (IMAGES, {"job_id": "bad id!"}, "job_id"),
    ]
    for path, params, field in cases:
        reply = api.client.get(path, params=params, headers=as_(ALICE))
        assert reply.status_code == 422, (path, params, reply.text)
        fields = assert_error_shape(reply.json(), "ValidationError")["fields"]
        assert [problem["loc"][-1] for problem in fields] == [field], (path, params)
    # Bob cannot use Alice's cursor to read her list: it is not his list's.
    stolen = api.client.get(IMAGES, params={"cursor": image_cursor}, headers=as_(BOB))
    assert stolen.status_code == 422


@MODES
def test_jobs_are_listed_newest_first_and_a_deleted_one_goes(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = owners_api(make_api, mode)
    created = [
        api.client.post(JOBS, json={"metadata": {"n": n}}, headers=as_(ALICE)).json()["job_id"]
        for n in range(5)
    ]
    api.client.post(JOBS, json={}, headers=as_(BOB))
    assert walk(api, JOBS, ALICE, limit=2) == [
        created[::-1][0:2],
        created[::-1][2:4],
        created[::-1][4:],
    ]
    item = api.client.get(JOBS, params={"limit": 1}, headers=as_(ALICE)).json()["items"][0]
    assert item["metadata"] == {"n": 4}
    assert api.client.delete(f"{JOBS}/{created[2]}", headers=as_(ALICE)).status_code == 204
    assert walk(api, JOBS, ALICE, limit=50) == [[c for c in created[::-1] if c != created[2]]]
    assert api.client.app.state.assets.storage.list_keys("job_records/index/") == sorted(
        api.client.app.state.assets.storage.list_keys("job_records/index/")
    )
    assert len(api.client.app.state.assets.storage.list_keys("job_records/index/")) == 5


@MODES
def test_generations_are_listed_with_a_status_filter(
    make_api: Callable[..., ApiHarness], mode: str
) -> None:
    blocking = BlockingGenerator()
    api = make_api(
        mode,
        generators={"replicate": blocking},
        image_generator="replicate",
        api_keys=f"alice:{ALICE},bob:{BOB}",
    )
    body = {"character_description": "a bee", "num_images": 1}
    first = api.client.post(GENERATIONS, json=body, headers=as_(ALICE)).json()["generation_id"]
    second = api.client.post(GENERATIONS, json=body, headers=as_(ALICE)).json()["generation_id"]
    api.client.post(GENERATIONS, json=body, headers=as_(BOB))
    assert blocking.started.wait(10)
    canceled = api.client.delete(f"{GENERATIONS}/{second}", headers=as_(ALICE))
    assert canceled.json()["status"] == "canceled"

    items = api.client.get(GENERATIONS, headers=as_(ALICE)).json()["items"]
    assert [(item["generation_id"], item["status"]) for item in items] == [
        (second, "canceled"),
        (first, "running"),
    ]
    assert items[1]["status_url"].endswith(f"{GENERATIONS}/{first}")
    running = api.client.get(GENERATIONS, params={"status": "running"}, headers=as_(ALICE))
    assert [item["generation_id"] for item in running.json()["items"]] == [first]
    # A status filter looks at one page of entries: fewer items, and the cursor goes on.
    page = api.client.get(
        GENERATIONS, params={"status": "running", "limit": 1}, headers=as_(ALICE)
    ).json()
    assert page["items"] == [] and page["next_cursor"] is not None
    rest = api.client.get(
        GENERATIONS,
        params={"status": "running", "limit": 1, "cursor": page["next_cursor"]},
        headers=as_(ALICE),
    ).json()
    assert [item["generation_id"] for item in rest["items"]] == [first]
    blocking.release.set()


def test_without_authentication_everything_is_listed(make_api: Callable[..., ApiHarness]) -> None:
    blocking = BlockingGenerator()
    blocking.release.set()
    api = make_api(generators={"replicate": blocking}, image_generator="replicate")
    image_id = api.client.post(UPLOAD, files={"file": ("a.png", image_bytes())}).json()["id"]
    job_id = api.client.post(JOBS, json={}).json()["job_id"]
    assert [item["id"] for item in api.client.get(IMAGES).json()["items"]] == [image_id]
    assert [item["job_id"] for item in api.client.get(JOBS).json()["items"]] == [job_id]


# ------------------------------------------------------------------ retention


def test_the_retention_sweep_removes_list_entries_with_their_images(
    storage: StorageHarness,
) -> None:
    if storage.is_s3:
        # In S3 the bucket's lifecycle rule expires by prefix: the entries share the
        # candidates' prefix, so the one rule expires both.
        index_key = storage.service.references.index.index.key(
            "alice", "all", datetime.now(UTC), str(uuid.uuid4())
        )
        assert index_key.startswith(candidate_rule(7)["Filter"]["Prefix"])
        return
    service = storage.service
    backend = storage.backend
    assert isinstance(backend, LocalStorageBackend)

    async def scenario() -> None:
        kept = str(uuid.uuid4())
        old = str(uuid.uuid4())
        for image_id in (old, kept):
            await service.store_character_reference(
                image_id, image_bytes(), details=GenerationDetails(owner="alice")
            )
        # An entry whose image is gone already (deleted by hand, say) expires too.
        stray = service.references.index.index.key(
            "alice", "all", datetime.now(UTC) - timedelta(days=30), str(uuid.uuid4())
        )
        backend.put_bytes(stray, b"", "application/octet-stream")
        long_ago = datetime.now(UTC).timestamp() - 30 * 86_400
        for key in backend.list_keys(CANDIDATES_PREFIX):
            if old in key or key == stray:
                os.utime(backend.path_for(key), (long_ago, long_ago))
        assert await sweep_expired_candidates(backend, days=7) == [old]
        page = await service.list_character_references("alice", ListFilter(), 10)
        assert [item.id for item in page.items] == [kept]
        remaining = backend.list_keys(CANDIDATES_PREFIX + "index/")
        assert [item_id_of(key) for key in remaining] == [kept]

    asyncio.run(scenario())


# ------------------------------------------------------------------ paging property


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.integers(min_value=0, max_value=12),
    limit=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=2)),
        max_size=8,
    ),
)
def test_paging_while_others_add_and_delete_returns_every_lasting_image_once(
    storage: StorageHarness, initial: int, limit: int, steps: list[tuple[int, int]]
) -> None:
    """Between any two pages, others add images and delete some (seen or not yet seen).
    Every image that existed throughout is returned exactly once; no image twice; none
    that was deleted before its page was read."""
    if storage.mode == "s3-real":
        pytest.skip("the property writes many objects")
    service = storage.service
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    counter = itertools.count()

    async def add() -> str:
        image_id = str(uuid.uuid4())
        data = image_bytes(size=(8 + next(counter) % 40, 8))
        await service.store_character_reference(
            image_id, data, details=GenerationDetails(owner=owner)
        )
        return image_id

    async def scenario() -> None:
        existing = [await add() for _ in range(initial)]
        deleted: set[str] = set()
        seen: list[str] = []
        names: list[str] = []
        cursor = None
        moves = iter(steps)
        while True:
            page = await service.list_character_references(owner, ListFilter(), limit, cursor)
            returned = [item.id for item in page.items]
            assert not deleted & set(returned)
            seen.extend(returned)
            names.extend(entry_name(item.created_at, item.id) for item in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
            adds, deletes = next(moves, (0, 0))
            existing.extend([await add() for _ in range(adds)])
            for image_id in [i for i in existing if i not in deleted][:deletes]:
                await service.delete_character_reference(image_id)
                deleted.add(image_id)
        lasting = [image_id for image_id in existing[:initial] if image_id not in deleted]
        assert len(seen) == len(set(seen))
        assert set(lasting) <= set(seen)
        # Newest first, and the walk only moves forward.
        assert names == sorted(set(names))

    asyncio.run(scenario())


def test_entry_names_sort_newest_first() -> None:
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    later = earlier + timedelta(milliseconds=1)
    assert entry_name(later, "b") < entry_name(earlier, "a")
    assert entry_name(earlier, "a") < entry_name(earlier, "b")
    assert item_id_of("x/y/" + entry_name(earlier, "job-with-dashes")) == "job-with-dashes"

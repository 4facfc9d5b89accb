"""Video jobs through the API, in local and S3 mode, and the worker's command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from config import BACKEND_DIR
from conftest import API_S3_MODES, ApiHarness, image_bytes

JOBS = "/api/mv/jobs"
UPLOAD = "/api/mv/upload_character_reference"


@pytest.fixture(params=["local", *API_S3_MODES])
def api(request: pytest.FixtureRequest, make_api: Callable[..., ApiHarness]) -> ApiHarness:
    """The app in each storage mode (S3 on each server), serving bytes."""
    return make_api(request.param)


def upload(api: ApiHarness, data: bytes | None = None) -> dict:
    """Upload an image; the 201 reply."""
    reply = api.client.post(UPLOAD, files={"file": ("me.png", data or image_bytes(), "image/png")})
    assert reply.status_code == 201, reply.text
    return reply.json()


def run_cli(api: ApiHarness, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m tools.job_assets ARGS` from backend/, with the app's storage settings."""
    settings = api.settings
    env = {
        **os.environ,
        "STORAGE_BACKEND": settings.storage_backend,
        "STORAGE_BUCKET": settings.storage_bucket or "",
        "AWS_ENDPOINT_URL": settings.aws_endpoint_url or "",
        "OUTPUT_DIR": str(settings.output_dir),
        "PUBLIC_BASE_URL": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "tools.job_assets", *args],
        cwd=BACKEND_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_job_lifecycle(api: ApiHarness, tmp_path: Path) -> None:
    # Create, with metadata; the id is ours.
    created = api.client.post(JOBS, json={"job_id": "video-1", "metadata": {"song": "Blue"}})
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == f"{JOBS}/video-1"
    job = created.json()
    assert job["job_id"] == "video-1"
    assert job["metadata"] == {"song": "Blue"}
    assert job["assets"] == job["character_references"] == []
    # Attach a picked character reference (twice: the second changes nothing).
    data = image_bytes()
    image = upload(api, data)
    for _ in range(2):
        attached = api.client.post(
            f"{JOBS}/video-1/character_references", json={"image_ids": [image["id"]]}
        )
        assert attached.status_code == 200, attached.text
    (reference,) = attached.json()["character_references"]
    assert reference["image_id"] == image["id"]
    assert reference["path"] == f"character_reference/{image['id']}.png"
    assert reference["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.fetch(reference["url"]).content == data
    served = api.client.get(f"{JOBS}/video-1/character_references/{image['id']}")
    assert served.status_code == 200
    assert served.content == data
    assert served.headers["etag"] == f'"{reference["sha256"]}"'
    # A worker pulls the job down, adds its results and pushes everything back.
    workdir = tmp_path / "video-1"
    pulled = run_cli(api, "download", "video-1", str(workdir))
    assert pulled.returncode == 0, pulled.stderr
    assert (workdir / reference["path"]).read_bytes() == data
    (workdir / "renders").mkdir()
    (workdir / "renders" / "final.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 video")
    pushed = run_cli(api, "persist", "video-1", str(workdir))
    assert pushed.returncode == 0, pushed.stderr
    assert len(json.loads(pushed.stdout)["renders"]) == 1
    # The job now lists every asset, each with a URL that serves it.
    job = api.client.get(f"{JOBS}/video-1").json()
    assert job["metadata"] == {"song": "Blue"}
    assert {asset["path"] for asset in job["assets"]} == {reference["path"], "renders/final.mp4"}
    render = next(asset for asset in job["assets"] if asset["category"] == "renders")
    assert render["image_id"] is None
    assert api.fetch(render["url"]).content == b"\x00\x00\x00\x18ftypmp42 video"
    asset = api.client.get(f"{JOBS}/video-1/assets/renders/final.mp4")
    assert asset.status_code == 200
    assert asset.headers["content-type"] == "video/mp4"
    assert asset.headers["cache-control"] == "no-cache"  # a later persist may replace it
    assert api.fetch(job["manifest_url"]).json()["job_id"] == "video-1"
    if api.s3 is not None:
        key = f"jobs/video-1/{reference['path']}"
        stored = api.s3.get_object(Bucket=api.settings.storage_bucket, Key=key)
        assert stored["Body"].read() == data


def test_job_ids_are_generated_and_taken_ids_refused(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    first, second = (api.client.post(JOBS, json={}).json() for _ in range(2))
    assert first["job_id"] != second["job_id"]
    assert api.client.get(f"{JOBS}/{first['job_id']}").status_code == 200
    taken = api.client.post(JOBS, json={"job_id": first["job_id"]})
    assert taken.status_code == 409
    assert taken.json()["detail"]["error"] == "JobExists"


def test_create_job_is_idempotent_with_a_key(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    headers = {"Idempotency-Key": "create-1"}
    first = api.client.post(JOBS, json={"metadata": {"a": 1}}, headers=headers)
    again = api.client.post(JOBS, json={"metadata": {"a": 1}}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["job_id"] == first.json()["job_id"]
    other = api.client.post(JOBS, json={"metadata": {"a": 2}}, headers=headers)
    assert other.status_code == 422
    assert other.json()["detail"]["fields"][0]["loc"] == ["header", "Idempotency-Key"]


def test_attaching_an_unknown_image_attaches_nothing(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    api.client.post(JOBS, json={"job_id": "j1"})
    known = upload(api)
    unknown = str(uuid.uuid4())
    reply = api.client.post(
        f"{JOBS}/j1/character_references", json={"image_ids": [known["id"], unknown]}
    )
    assert reply.status_code == 404
    assert unknown in reply.json()["detail"]["message"]
    assert api.client.get(f"{JOBS}/j1").json()["assets"] == []
    assert not (api.settings.output_dir / "jobs" / "j1").exists()


def test_missing_jobs_and_assets_are_404(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    image = upload(api)
    assert api.client.get(f"{JOBS}/nope").status_code == 404
    missing_job = api.client.post(
        f"{JOBS}/nope/character_references", json={"image_ids": [image["id"]]}
    )
    assert missing_job.status_code == 404
    api.client.post(JOBS, json={"job_id": "j2"})
    not_attached = api.client.get(f"{JOBS}/j2/character_references/{image['id']}")
    assert not_attached.status_code == 404
    assert api.client.get(f"{JOBS}/j2/assets/renders/none.mp4").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("post", JOBS, {"job_id": "-starts-with-dash"}, "job_id"),
        ("post", JOBS, {"job_id": "a" * 129}, "job_id"),
        ("post", JOBS, {"job_id": "../escape"}, "job_id"),
        ("post", JOBS, {"metadata": {"blob": "x" * 20_000}}, "metadata"),
        ("post", JOBS, {"metadata": ["not", "an", "object"]}, "metadata"),
        ("post", JOBS, {"surprise": 1}, "surprise"),
        ("post", f"{JOBS}/j3/character_references", {"image_ids": []}, "image_ids"),
        ("post", f"{JOBS}/j3/character_references", {"image_ids": ["nope"]}, "image_ids"),
        ("post", f"{JOBS}/j3/character_references", {"image_ids": ["a"] * 17}, "image_ids"),
        ("get", f"{JOBS}/bad%20id", None, "job_id"),
        ("get", f"{JOBS}/j3/character_references/not-a-uuid", None, "image_id"),
    ],
)
def test_bad_job_input_is_422_naming_the_field(
    make_api: Callable[..., ApiHarness], method: str, path: str, body: object, field: str
) -> None:
    api = make_api()
    reply = api.client.request(method.upper(), path, json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"]["fields"][0]["loc"][1] == field


def test_asset_paths_cannot_leave_the_job(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    api.client.post(JOBS, json={"job_id": "j4"})
    upload(api)  # something outside the job that a traversal would aim at
    for path in ("..%2F..%2Fcharacter_references%2Fx.png", "a/%2E%2E/%2E%2E/b", "%00", "a//b"):
        reply = api.client.get(f"{JOBS}/j4/assets/{path}")
        assert reply.status_code == 422, path
        assert reply.json()["detail"]["fields"][0]["loc"] == ["path", "path"]


def test_cloud_serving_of_job_assets(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api("s3", serve_from_cloud=True)
    api.client.post(JOBS, json={"job_id": "j5"})
    data = image_bytes()
    image = upload(api, data)
    api.client.post(f"{JOBS}/j5/character_references", json={"image_ids": [image["id"]]})
    location = api.client.get(f"{JOBS}/j5/character_references/{image['id']}").json()
    assert location["image_id"] == image["id"]
    assert location["cloud_path"] == f"jobs/j5/character_reference/{image['id']}.png"
    assert api.fetch(location["image_url"]).content == data
    redirect = api.client.get(
        f"{JOBS}/j5/character_references/{image['id']}?redirect=true", follow_redirects=False
    )
    assert redirect.status_code == 307
    assert api.fetch(redirect.headers["location"]).content == data
    manifest = api.client.get(f"{JOBS}/j5/assets/manifest.json").json()
    assert manifest["path"] == "manifest.json"
    assert api.fetch(manifest["asset_url"]).json()["job_id"] == "j5"


def test_cli_reports_a_missing_job_in_one_line(
    make_api: Callable[..., ApiHarness], tmp_path: Path
) -> None:
    api = make_api()
    result = run_cli(api, "download", "no-such-job", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no-such-job" in result.stderr
    assert "Traceback" not in result.stderr


def test_attaching_again_rewrites_nothing(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    api.client.post(JOBS, json={"job_id": "j6"})
    image = upload(api)
    attach = {"image_ids": [image["id"]]}
    api.client.post(f"{JOBS}/j6/character_references", json=attach)
    job_dir = api.settings.output_dir / "jobs" / "j6"
    before = {path: path.stat().st_mtime_ns for path in job_dir.rglob("*") if path.is_file()}
    again = api.client.post(f"{JOBS}/j6/character_references", json=attach)
    assert again.status_code == 200
    after = {path: path.stat().st_mtime_ns for path in job_dir.rglob("*") if path.is_file()}
    assert after == before
    assert len(before) == 2  # the image and the manifest

"""CANDIDATE_RETENTION_DAYS: an S3 lifecycle rule a command installs and verifies; a sweep of
the local tier. Picked images survive in their job."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from config import get_settings
from conftest import (
    S3_STORAGE_MODES,
    ApiHarness,
    StorageHarness,
    new_bucket_name,
    photo_like_png,
    wait_until,
)
from services.asset_persistence import (
    CANDIDATES_PREFIX,
    LIFECYCLE_RULE_ID,
    install_lifecycle_rule,
    lifecycle_problem,
    sweep_expired_candidates,
)
from services.storage.local import LocalStorageBackend
from services.storage.s3 import make_s3_client
from tools import retention as retention_command

DAY = 86_400
OTHER_RULE = {
    "ID": "keep-logs-a-week",
    "Filter": {"Prefix": "logs/"},
    "Status": "Enabled",
    "Expiration": {"Days": 7},
}


@pytest.mark.parametrize("storage_mode", S3_STORAGE_MODES)
def test_the_lifecycle_rule_is_installed_verified_and_keeps_other_rules(
    storage: StorageHarness,
) -> None:
    s3, bucket = storage.s3, storage.settings.storage_bucket
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [OTHER_RULE]}
    )
    assert lifecycle_problem(s3, bucket, 30) == f"rule {LIFECYCLE_RULE_ID} is not installed"
    install_lifecycle_rule(s3, bucket, 30)
    install_lifecycle_rule(s3, bucket, 30)  # again: still one rule
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    ours = [rule for rule in rules if rule["ID"] == LIFECYCLE_RULE_ID]
    assert len(ours) == 1
    assert ours[0]["Filter"]["Prefix"] == CANDIDATES_PREFIX
    assert ours[0]["Expiration"]["Days"] == 30
    assert any(rule["ID"] == OTHER_RULE["ID"] for rule in rules)
    assert lifecycle_problem(s3, bucket, 30) is None
    assert "expires after 30 days, not 7" in str(lifecycle_problem(s3, bucket, 7))
    install_lifecycle_rule(s3, bucket, None)  # retention turned off: our rule goes
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [rule["ID"] for rule in rules] == [OTHER_RULE["ID"]]


def test_the_command_installs_then_verifies(
    s3_server: str,
    make_settings: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = new_bucket_name()
    s3 = make_s3_client(region="us-east-1", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    environment = {
        "STORAGE_BACKEND": "s3",
        "STORAGE_BUCKET": bucket,
        "AWS_ENDPOINT_URL": s3_server,
        "CANDIDATE_RETENTION_DAYS": "14",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert retention_command.main(["verify"]) == 1
        assert "is not installed" in capsys.readouterr().err
        assert retention_command.main(["install"]) == 0
        assert "expire after 14 days" in capsys.readouterr().out
        assert retention_command.main(["verify"]) == 0
        monkeypatch.setenv("CANDIDATE_RETENTION_DAYS", "15")
        get_settings.cache_clear()
        assert retention_command.main(["verify"]) == 1
        assert "not 15" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def _age(api: ApiHarness, image_id: str, days: float) -> None:
    """Make every stored file of a candidate look `days` days old."""
    old = time.time() - days * DAY
    for path in (api.settings.output_dir / "character_references").glob(f"{image_id}*"):
        os.utime(path, (old, old))


def test_the_local_sweep_deletes_old_candidates_but_not_job_copies(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api()
    data = photo_like_png(256, 256)
    old, new = (
        api.client.post(
            "/api/mv/upload_character_reference", files={"file": ("a.png", data)}
        ).json()
        for _ in range(2)
    )
    assert api.client.get(old["thumbnail_url"]).status_code == 200
    assert api.client.post("/api/mv/jobs", json={"job_id": "picked"}).status_code == 201
    attach = api.client.post(
        "/api/mv/jobs/picked/character_references", json={"image_ids": [old["id"]]}
    )
    assert attach.status_code == 200
    _age(api, old["id"], 31)
    _age(api, new["id"], 29)

    local = LocalStorageBackend(api.settings.output_dir)
    assert asyncio.run(sweep_expired_candidates(local, 30)) == [old["id"]]
    assert not list((api.settings.output_dir / "character_references").glob(f"{old['id']}*"))
    assert api.client.get(old["url"]).status_code == 404
    assert api.client.get(new["url"]).status_code == 200
    job_copy = api.client.get(f"/api/mv/jobs/picked/character_references/{old['id']}")
    assert job_copy.status_code == 200
    assert job_copy.content == data


def test_the_api_sweeps_in_the_background_when_retention_is_set(
    make_api: Callable[..., ApiHarness], make_settings: Callable[..., Any]
) -> None:
    # An old candidate is on disk before the server starts: the start-up sweep removes it.
    output_dir = make_settings().output_dir
    stale = LocalStorageBackend(output_dir)
    stale.put_bytes(
        f"{CANDIDATES_PREFIX}0b0c2a52-3c1b-4c55-9d44-0d2c6f7a9e11.png", b"x", "image/png"
    )
    path = output_dir / f"{CANDIDATES_PREFIX}0b0c2a52-3c1b-4c55-9d44-0d2c6f7a9e11.png"
    os.utime(path, (time.time() - 3 * DAY,) * 2)
    api = make_api(candidate_retention_days=2)
    wait_until(lambda: not path.exists(), timeout=10)
    fresh = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", photo_like_png(64, 64))}
    )
    assert api.client.get(fresh.json()["url"]).status_code == 200

"""Ids, keys and paths are checked before any I/O; nothing escapes its prefix or the root."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from mv.ids import InvalidKeyError, parse_image_id, parse_job_id
from services.asset_persistence import AssetPersistenceService, ManifestEntry
from services.storage import (
    LocalStorageBackend,
    character_reference_key,
    job_asset_key,
    validate_key,
)

BAD_IMAGE_IDS = [
    "",
    "../x",
    "/etc/passwd",
    "%2e%2e",
    "..%2f..%2fetc",
    "..",
    "not-a-uuid",
    "12345678-1234-1234-1234-12345678901",
    "12345678-1234-1234-1234-1234567890123",
    f"{uuid.uuid4()}/../x",
    f"{uuid.uuid4()}\x00",
    None,
    42,
]
BAD_JOB_IDS = [
    "",
    "../x",
    "/abs/path",
    "%2e%2e",
    "..",
    ".hidden",
    "a/b",
    "a\\b",
    "job\n",
    "-leading",
    "x" * 129,
    "job id",
    "jöb",
    None,
]
BAD_KEYS = [
    "",
    "/abs",
    "../x",
    "a/../b",
    "a/./b",
    "a//b",
    "a/",
    ".storage/pending/x",
    "a\\b",
    "a/%2e%2e/b",
    "a/\x00",
    "x" * 1025,
]


class NoIOStorage:
    """A backend that fails the test if anything reaches it."""

    name = "no-io"

    def __getattr__(self, attribute: str) -> Any:
        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"storage.{attribute} was called for an invalid id")

        return refuse


@pytest.fixture
def no_io_service(make_settings: Callable[..., Settings]) -> AssetPersistenceService:
    """A service whose storage must never be touched."""
    return AssetPersistenceService(NoIOStorage(), settings=make_settings())  # type: ignore[arg-type]


@pytest.mark.parametrize("image_id", BAD_IMAGE_IDS)
def test_bad_image_ids_are_refused(image_id: object) -> None:
    with pytest.raises(InvalidKeyError, match="image id must be a UUID"):
        parse_image_id(image_id)


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_bad_job_ids_are_refused(job_id: object) -> None:
    with pytest.raises(InvalidKeyError, match="job id must match"):
        parse_job_id(job_id)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_image_ids_are_canonicalised() -> None:
    value = uuid.uuid4()
    assert parse_image_id(str(value).upper()) == str(value)
    assert parse_image_id(value.hex) == str(value)
    assert character_reference_key(str(value), "JPEG") == f"character_references/{value}.jpg"


@pytest.mark.parametrize("image_id", BAD_IMAGE_IDS)
async def test_service_refuses_bad_image_ids_before_io(
    no_io_service: AssetPersistenceService, image_id: Any, tmp_path: Path
) -> None:
    with pytest.raises(InvalidKeyError):
        await no_io_service.persist_character_reference(image_id, tmp_path / "a.png")
    with pytest.raises(InvalidKeyError):
        await no_io_service.get_character_reference_url(image_id)
    with pytest.raises(InvalidKeyError):
        await no_io_service.associate_character_images_with_job("job", [image_id], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("job_id", [job_id for job_id in BAD_JOB_IDS if job_id is not None])
async def test_service_refuses_bad_job_ids_before_io(
    no_io_service: AssetPersistenceService, job_id: Any, tmp_path: Path
) -> None:
    image_id = str(uuid.uuid4())
    with pytest.raises(InvalidKeyError):
        await no_io_service.persist_character_reference(image_id, tmp_path / "a.png", job_id)
    with pytest.raises(InvalidKeyError):
        await no_io_service.get_character_reference_url(image_id, job_id=job_id)
    with pytest.raises(InvalidKeyError):
        await no_io_service.associate_character_images_with_job(job_id, [image_id], tmp_path)
    with pytest.raises(InvalidKeyError):
        await no_io_service.persist_job_assets(job_id, tmp_path)
    with pytest.raises(InvalidKeyError):
        await no_io_service.download_job_assets(job_id, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_bad_extension_is_refused_before_io(no_io_service: AssetPersistenceService) -> None:
    with pytest.raises(InvalidKeyError, match="extension"):
        await no_io_service.get_character_reference_url(str(uuid.uuid4()), extension="../x")


async def test_image_ids_as_one_string_are_refused(
    no_io_service: AssetPersistenceService, tmp_path: Path
) -> None:
    with pytest.raises(InvalidKeyError, match="list of ids"):
        await no_io_service.associate_character_images_with_job("job", str(uuid.uuid4()), tmp_path)


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a/../../b", "a\\..\\b"])
def test_manifest_paths_cannot_escape_the_job_directory(path: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        ManifestEntry(path=path, category="x", size=1, sha256="0" * 64, content_type="text/plain")


def test_job_keys_stay_under_their_prefix() -> None:
    assert job_asset_key("job-1", "frames/0001.png") == "jobs/job-1/frames/0001.png"
    with pytest.raises(InvalidKeyError):
        job_asset_key("job-1", "../job-2/x")


def test_local_backend_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "jobs").mkdir(parents=True)
    (root / "jobs" / "evil").symlink_to(outside)
    backend = LocalStorageBackend(root)
    with pytest.raises(InvalidKeyError, match="escapes"):
        backend.get_bytes("jobs/evil/secret.txt")
    with pytest.raises(InvalidKeyError, match="escapes"):
        backend.put_bytes("jobs/evil/new.txt", b"x", "text/plain")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_job_directory_symlinks_and_reserved_names(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    service = AssetPersistenceService(LocalStorageBackend(settings.output_dir), settings=settings)
    job_dir = tmp_path / "job"
    (job_dir / "frames").mkdir(parents=True)
    (job_dir / "frames" / "a.txt").write_text("a")
    (tmp_path / "private.txt").write_text("private")
    (job_dir / "frames" / "link.txt").symlink_to(tmp_path / "private.txt")
    result = await service.persist_job_assets("job-s", job_dir)
    assert len(result["frames"]) == 1  # the symlink is not followed
    (job_dir / "manifest").mkdir()
    (job_dir / "manifest" / "x.txt").write_text("x")
    with pytest.raises(InvalidKeyError, match="reserved"):
        await service.persist_job_assets("job-s", job_dir)

"""AssetPersistenceService behaviour, identical in every storage mode."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import StorageHarness, image_bytes
from services.asset_persistence import (
    CharacterReferenceNotFoundError,
    GenerationDetails,
    JobManifest,
    JobNotFoundError,
    UnsupportedImageError,
)
from services.storage import IntegrityError


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_url_serves(storage: StorageHarness, url: str, key: str) -> None:
    """Local mode: the API path; S3 mode: a presigned URL for the key."""
    if storage.is_s3:
        parts = urlsplit(url)
        assert parts.path.endswith("/" + key)
        query = parse_qs(parts.query)
        assert query["X-Amz-Expires"] == [str(storage.settings.presigned_url_expiry)]
        assert "X-Amz-Signature" in query
    else:
        assert url.startswith("/api/mv/")


def make_job_directory(root: Path) -> Path:
    """A nested job directory with images, audio, video and a top-level file."""
    files = {
        "character_reference/0f7e3f36-9f5c-4a8e-8a7e-2f0e4a1b2c3d.png": image_bytes("PNG"),
        "frames/scene_01/0001.png": image_bytes("PNG", (32, 32)),
        "frames/scene_01/0002.jpg": image_bytes("JPEG", (32, 32)),
        "frames/scene_02/deep/0001.webp": image_bytes("WEBP", (16, 16)),
        "audio/track.wav": b"RIFF" + bytes(range(256)) * 8,
        "video/final.mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 5000,
        "prompt.txt": b"a silver robot with a red shield\n",
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


async def test_persist_standalone_writes_image_and_sidecar(
    storage: StorageHarness, write_image: Callable[..., Path]
) -> None:
    image_id = str(uuid.uuid4())
    source = write_image("candidate.png")
    details = GenerationDetails(description="a silver robot", seed=7, backend="local")

    url = await storage.service.persist_character_reference(image_id, source, details=details)

    key = f"character_references/{image_id}.png"
    assert storage.backend.get_bytes(key) == source.read_bytes()
    assert_url_serves(storage, url, key)
    sidecar = json.loads(storage.backend.get_bytes(f"character_references/{image_id}.json"))
    assert sidecar["id"] == image_id
    assert sidecar["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert sidecar["size"] == source.stat().st_size
    assert (sidecar["width"], sidecar["height"]) == (64, 48)
    assert sidecar["content_type"] == "image/png"
    assert (sidecar["description"], sidecar["seed"], sidecar["backend"]) == (
        "a silver robot",
        7,
        "local",
    )
    if storage.is_s3:
        stored = storage.s3_object(key)
        assert stored["ContentType"] == "image/png"
        assert stored["Body"].read() == source.read_bytes()
        assert list(storage.service.pending_uploads()) == []


async def test_persist_under_job_uses_job_key_only(
    storage: StorageHarness, write_image: Callable[..., Path]
) -> None:
    image_id = str(uuid.uuid4())
    url = await storage.service.persist_character_reference(
        image_id, write_image(), job_id="job_42"
    )
    key = f"jobs/job_42/character_reference/{image_id}.png"
    assert storage.backend.exists(key)
    assert not storage.backend.exists(f"character_references/{image_id}.png")
    assert_url_serves(storage, url, key)


async def test_persist_missing_file_raises_and_stores_nothing(
    storage: StorageHarness, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        await storage.service.persist_character_reference(
            str(uuid.uuid4()), tmp_path / "absent.png"
        )
    assert storage.backend.list_keys("character_references") == []


@pytest.mark.parametrize(
    ("filename", "image_format", "extension", "content_type"),
    [
        ("a.png", "PNG", "png", "image/png"),
        ("a.jpg", "JPEG", "jpg", "image/jpeg"),
        ("a.jpeg", "JPEG", "jpg", "image/jpeg"),
        ("a.webp", "WEBP", "webp", "image/webp"),
        ("no_suffix", "WEBP", "webp", "image/webp"),
    ],
)
async def test_content_types_follow_the_image_bytes(
    storage: StorageHarness,
    write_image: Callable[..., Path],
    filename: str,
    image_format: str,
    extension: str,
    content_type: str,
) -> None:
    image_id = str(uuid.uuid4())
    await storage.service.persist_character_reference(image_id, write_image(filename, image_format))
    key = f"character_references/{image_id}.{extension}"
    assert storage.backend.head(key).content_type == content_type
    if storage.is_s3:
        assert storage.s3_object(key)["ContentType"] == content_type
    url = await storage.service.get_character_reference_url(image_id, extension=extension)
    assert url is not None


async def test_persist_refuses_non_images_and_mismatched_names(
    storage: StorageHarness, write_image: Callable[..., Path], tmp_path: Path
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UnsupportedImageError, match="not a PNG, JPEG or WebP image"):
        await storage.service.persist_character_reference(str(uuid.uuid4()), text)
    with pytest.raises(UnsupportedImageError, match="name says png but the content is jpg"):
        await storage.service.persist_character_reference(
            str(uuid.uuid4()), write_image("liar.png", "JPEG")
        )
    assert storage.backend.list_keys("character_references") == []


async def test_get_url_for_existing_and_missing_images(
    storage: StorageHarness, write_image: Callable[..., Path]
) -> None:
    image_id = str(uuid.uuid4())
    service = storage.service
    assert await service.get_character_reference_url(image_id) is None
    await service.persist_character_reference(image_id, write_image())
    url = await service.get_character_reference_url(image_id)
    assert url is not None
    assert_url_serves(storage, url, f"character_references/{image_id}.png")
    assert await service.get_character_reference_url(image_id, extension="webp") is None
    assert await service.get_character_reference_url(image_id, job_id="other-job") is None
    # An upper-case id names the same image.
    upper_url = await service.get_character_reference_url(image_id.upper())
    assert upper_url is not None
    assert_url_serves(storage, upper_url, f"character_references/{image_id}.png")


async def test_associate_copies_images_into_job_in_order(
    storage: StorageHarness, write_image: Callable[..., Path], tmp_path: Path
) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await storage.service.persist_character_reference(first, write_image("1.png"))
    await storage.service.persist_character_reference(second, write_image("2.webp", "WEBP"))
    job_dir = tmp_path / "job"

    urls = await storage.service.associate_character_images_with_job(
        "job-7", [second, first], job_dir
    )

    assert len(urls) == 2
    assert_url_serves(storage, urls[0], f"jobs/job-7/character_reference/{second}.webp")
    assert_url_serves(storage, urls[1], f"jobs/job-7/character_reference/{first}.png")
    assert (job_dir / "character_reference" / f"{first}.png").read_bytes() == (
        storage.backend.get_bytes(f"character_references/{first}.png")
    )
    assert storage.backend.get_bytes(f"jobs/job-7/character_reference/{second}.webp") == (
        (job_dir / "character_reference" / f"{second}.webp").read_bytes()
    )
    # Associating again is harmless and gives the same keys.
    again = await storage.service.associate_character_images_with_job("job-7", [first], job_dir)
    assert_url_serves(storage, again[0], f"jobs/job-7/character_reference/{first}.png")


async def test_associate_unknown_id_names_it_and_copies_nothing(
    storage: StorageHarness, write_image: Callable[..., Path], tmp_path: Path
) -> None:
    known, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    await storage.service.persist_character_reference(known, write_image())
    job_dir = tmp_path / "job"
    with pytest.raises(CharacterReferenceNotFoundError, match=unknown) as raised:
        await storage.service.associate_character_images_with_job(
            "job-8", [known, unknown], job_dir
        )
    assert isinstance(raised.value, FileNotFoundError)
    assert not job_dir.exists()
    assert storage.backend.list_keys("jobs/job-8") == []


async def test_persist_job_assets_stores_nested_tree_and_manifest(
    storage: StorageHarness, tmp_path: Path
) -> None:
    job_dir = make_job_directory(tmp_path / "job")

    result = await storage.service.persist_job_assets("job-1", job_dir)

    assert sorted(result) == [
        "audio",
        "character_references",
        "files",
        "frames",
        "manifest",
        "video",
    ]
    assert len(result["character_references"]) == 1
    assert len(result["frames"]) == 3
    assert len(result["files"]) == 1
    assert_url_serves(storage, str(result["manifest"]), "jobs/job-1/manifest.json")
    expected = tree_hashes(job_dir)
    stored_keys = storage.backend.list_keys("jobs/job-1")
    assert stored_keys == sorted(
        [f"jobs/job-1/{path}" for path in expected] + ["jobs/job-1/manifest.json"]
    )
    raw_manifest = storage.backend.get_bytes("jobs/job-1/manifest.json")
    manifest = JobManifest.model_validate_json(raw_manifest)
    assert {entry.path: entry.sha256 for entry in manifest.files} == expected
    categories = {entry.path: entry.category for entry in manifest.files}
    assert categories["frames/scene_02/deep/0001.webp"] == "frames"
    assert categories["prompt.txt"] == "files"
    sizes = {entry.path: entry.size for entry in manifest.files}
    assert sizes["video/final.mp4"] == (job_dir / "video/final.mp4").stat().st_size
    types = {entry.path: entry.content_type for entry in manifest.files}
    assert types["frames/scene_01/0002.jpg"] == "image/jpeg"
    assert types["audio/track.wav"] in {"audio/x-wav", "audio/wav"}


async def test_download_restores_identical_tree(storage: StorageHarness, tmp_path: Path) -> None:
    job_dir = make_job_directory(tmp_path / "worker-a")
    await storage.service.persist_job_assets("job-2", job_dir)
    elsewhere = tmp_path / "worker-b"

    paths = await storage.service.download_job_assets("job-2", elsewhere)

    assert tree_hashes(elsewhere) == tree_hashes(job_dir)
    assert sorted(paths) == sorted(str(elsewhere / path) for path in tree_hashes(job_dir))
    # A second download finds everything in place and changes nothing.
    assert await storage.service.download_job_assets("job-2", elsewhere) == paths
    assert tree_hashes(elsewhere) == tree_hashes(job_dir)


async def test_download_detects_corrupted_object_and_leaves_no_partial_file(
    storage: StorageHarness, tmp_path: Path
) -> None:
    job_dir = make_job_directory(tmp_path / "job")
    await storage.service.persist_job_assets("job-3", job_dir)
    storage.backend.put_bytes("jobs/job-3/video/final.mp4", b"tampered", "video/mp4")
    target = tmp_path / "restore"

    with pytest.raises(IntegrityError, match=r"final\.mp4"):
        await storage.service.download_job_assets("job-3", target)

    assert not (target / "video" / "final.mp4").exists()
    assert [p for p in target.rglob("*") if p.is_file() and p.name.startswith(".tmp")] == []


async def test_download_of_unknown_job_raises(storage: StorageHarness, tmp_path: Path) -> None:
    with pytest.raises(JobNotFoundError, match="no-such-job"):
        await storage.service.download_job_assets("no-such-job", tmp_path / "x")


async def test_persist_job_assets_requires_a_directory(
    storage: StorageHarness, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="job directory not found"):
        await storage.service.persist_job_assets("job-4", tmp_path / "missing")

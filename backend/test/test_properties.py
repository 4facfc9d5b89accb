"""Property tests (hypothesis): no id or key, however strange, leaves the storage root or its
prefix; retry delays always stay within their bounds."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mv.ids import InvalidKeyError, parse_image_id, parse_job_id
from services.backoff import backoff_delay, parse_retry_after
from services.idempotency import IdempotencyKeyError, check_key, record_key
from services.storage.keys import (
    CHARACTER_REFERENCES_PREFIX,
    character_reference_key,
    job_asset_key,
    job_character_reference_key,
    job_manifest_key,
    validate_key,
)
from services.storage.local import LocalStorageBackend

# Text biased towards what attacks paths: separators, dots, encodings, NULs, unicode look-alikes.
PATH_PIECES = st.sampled_from(
    ["..", ".", "/", "\\", "%2e", "%2f", "%00", "\x00", "\u2024", "\uff0e", "~", ":", " ", "a"]
)
HOSTILE_TEXT = st.lists(st.one_of(PATH_PIECES, st.text(max_size=8)), max_size=12).map("".join)
NOT_CHECKED = HealthCheck.function_scoped_fixture  # tmp_path is used read-only as a root


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(root)


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One storage root; nothing is written to it."""
    return tmp_path_factory.mktemp("root").resolve()


@given(key=HOSTILE_TEXT)
@example(key="../etc/passwd")
@example(key="jobs/../../x")
@example(key="%2e%2e/x")
@example(key="/abs")
@example(key="a\\..\\b")
@settings(max_examples=400, suppress_health_check=[NOT_CHECKED])
def test_no_key_maps_outside_the_storage_root(storage_root: Path, key: str) -> None:
    storage = LocalStorageBackend(storage_root)
    try:
        path = storage.path_for(key)
    except InvalidKeyError:
        return
    assert _inside(path, storage_root)
    assert path != storage_root
    # An accepted key has no segment a file system or URL decoder would treat specially.
    assert all(segment not in {"", ".", ".."} for segment in key.split("/"))
    assert "%" not in key and "\\" not in key and "\x00" not in key


@given(job_id=HOSTILE_TEXT, relative=HOSTILE_TEXT)
@example(job_id="job", relative="../other-job/manifest.json")
@example(job_id="..", relative="x")
@settings(max_examples=400)
def test_no_job_asset_key_leaves_its_job_prefix(job_id: str, relative: str) -> None:
    try:
        key = job_asset_key(job_id, relative)
    except InvalidKeyError:
        return
    assert key.startswith(f"jobs/{job_id}/")
    assert os.path.normpath(key).startswith(f"jobs/{job_id}/")
    assert validate_key(key) == key


@given(job_id=HOSTILE_TEXT)
@settings(max_examples=300)
def test_job_ids_are_exactly_the_documented_pattern(job_id: str) -> None:
    allowed = set(string.ascii_letters + string.digits + "_-")
    valid = (
        1 <= len(job_id) <= 128
        and job_id[0] in string.ascii_letters + string.digits
        and set(job_id) <= allowed
    )
    if valid:
        assert parse_job_id(job_id) == job_id
        assert job_manifest_key(job_id) == f"jobs/{job_id}/manifest.json"
    else:
        with pytest.raises(InvalidKeyError):
            parse_job_id(job_id)


@given(value=st.one_of(HOSTILE_TEXT, st.uuids().map(str), st.uuids().map(lambda u: u.hex)))
@settings(max_examples=300)
def test_image_ids_are_canonical_uuids_and_stay_in_their_prefix(value: str) -> None:
    try:
        image_id = parse_image_id(value)
    except InvalidKeyError:
        return
    assert len(image_id) == 36 and image_id.count("-") == 4
    assert set(image_id) <= set("0123456789abcdef-")
    key = character_reference_key(value, "png")
    assert key == f"{CHARACTER_REFERENCES_PREFIX}/{image_id}.png"
    assert job_character_reference_key("job", value, "jpeg").startswith("jobs/job/")


@given(key=st.text(max_size=300))
@example(key="")
@example(key="a" * 256)
@example(key="clé")
@example(key="line\nbreak")
@settings(max_examples=300)
def test_idempotency_keys_accept_exactly_printable_ascii_up_to_255(key: str) -> None:
    valid = 1 <= len(key) <= 255 and all(" " <= char <= "~" for char in key)
    if not valid:
        with pytest.raises(IdempotencyKeyError):
            check_key(key)
        return
    assert check_key(key) == key
    # Whatever the key, its record is stored under one fixed-shape name inside its scope.
    stored = record_key("jobs", key)
    assert stored.startswith("idempotency/jobs/") and stored.endswith(".json")
    assert len(stored.removeprefix("idempotency/jobs/").removesuffix(".json")) == 64
    assert validate_key(stored) == stored


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=60, allow_nan=False),
    cap=st.floats(min_value=0.001, max_value=600, allow_nan=False),
    retry_after=st.one_of(st.none(), st.floats(min_value=-1e9, allow_nan=False)),
)
@settings(max_examples=500)
def test_backoff_stays_within_its_bounds(
    attempt: int, base: float, cap: float, retry_after: float | None
) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, retry_after=retry_after)
    assert 0 <= delay <= cap * 3  # a hostile Retry-After cannot park a caller for longer
    if retry_after is None or retry_after <= 0:
        assert delay <= cap
        if attempt <= 60:
            assert delay <= base * 2 ** (attempt - 1)
    else:
        assert delay >= min(retry_after, cap * 3)  # never sooner than the server asked


@given(value=st.one_of(st.none(), st.text(max_size=40), st.integers(0, 10**12).map(str)))
@example(value="²")  # str.isdigit() is true for it, float() refuses it
@example(value="9" * 400)
@example(value="Wed, 21 Oct 2015 07:28:00 GMT")
@settings(max_examples=300)
def test_retry_after_parsing_never_raises_and_is_never_negative(value: str | None) -> None:
    parsed = parse_retry_after(value)
    assume(parsed is not None)
    assert parsed >= 0

"""Keys: the one layout every storage tier shares, checked before any I/O.

Keys are built from ids (`mv.ids`: image ids are UUIDs, job ids match a pattern) and paths
inside a job directory; a malformed one raises `mv.ids.InvalidKeyError`.
"""

from __future__ import annotations

import re

from echo import shown
from mv.ids import InvalidKeyError, is_job_id, parse_image_id, parse_job_id

CHARACTER_REFERENCES_PREFIX = "character_references"
JOBS_PREFIX = "jobs"
JOB_CHARACTER_REFERENCE_DIR = "character_reference"
MANIFEST_NAME = "manifest.json"
MAX_KEY_BYTES = 1024

_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Extension of stored images -> content type. "jpeg" is stored as "jpg" so one image has one key.
IMAGE_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_EXTENSION_ALIASES = {"jpeg": "jpg"}


def normalize_image_extension(extension: str) -> str:
    """Map 'PNG', '.jpeg', 'webp'... to the stored extension, or raise for other types."""
    ext = extension.lower().lstrip(".")
    ext = _EXTENSION_ALIASES.get(ext, ext)
    if ext not in IMAGE_CONTENT_TYPES:
        allowed = ", ".join(sorted({*IMAGE_CONTENT_TYPES, *_EXTENSION_ALIASES}))
        raise InvalidKeyError(f"image extension must be one of {allowed}, got {shown(extension)}")
    return ext


def validate_key(key: object) -> str:
    """Check a storage key: relative, '/'-separated, no empty, '.' or '..' segment, no escapes."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"storage key must be a non-empty string, got {shown(key)}")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"storage key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/") or "\\" in key or "%" in key:
        raise InvalidKeyError(f"storage key must be relative, without '\\' or '%': {shown(key)}")
    if _CONTROL_OR_SURROGATE.search(key):
        raise InvalidKeyError(f"storage key contains control characters: {shown(key)}")
    segments = key.split("/")
    if any(segment in {"", ".", ".."} for segment in segments):
        raise InvalidKeyError(f"storage key has an empty, '.' or '..' segment: {shown(key)}")
    if segments[0].startswith("."):
        raise InvalidKeyError(f"storage keys starting with '.' are reserved: {shown(key)}")
    return key


def character_reference_key(image_id: str, extension: str) -> str:
    """Key of a standalone character reference image."""
    name = f"{parse_image_id(image_id)}.{normalize_image_extension(extension)}"
    return f"{CHARACTER_REFERENCES_PREFIX}/{name}"


def character_reference_sidecar_key(image_id: str) -> str:
    """Key of a standalone character reference's metadata sidecar."""
    return f"{CHARACTER_REFERENCES_PREFIX}/{parse_image_id(image_id)}.json"


def job_prefix(job_id: str) -> str:
    """Prefix (with trailing '/') under which all of a job's assets live."""
    return f"{JOBS_PREFIX}/{parse_job_id(job_id)}/"


def job_asset_key(job_id: str, relative_path: str) -> str:
    """Key of a file at `relative_path` inside the job directory."""
    return validate_key(job_prefix(job_id) + validate_key(relative_path))


def job_character_reference_key(job_id: str, image_id: str, extension: str) -> str:
    """Key of a character reference attached to a job."""
    name = f"{parse_image_id(image_id)}.{normalize_image_extension(extension)}"
    return job_asset_key(job_id, f"{JOB_CHARACTER_REFERENCE_DIR}/{name}")


# Thumbnails of an image live next to it: `<key without extension>.thumb<size>.webp`.
THUMBNAIL_SIZES = (256, 512)
_THUMBNAIL_SUFFIX = re.compile(r"\.thumb\d+\.webp$")


def thumbnail_key(image_key: str, size: int) -> str:
    """Key of the `size`-px WebP thumbnail of the image stored under `image_key`."""
    if size not in THUMBNAIL_SIZES:
        raise InvalidKeyError(f"thumbnail size must be one of {THUMBNAIL_SIZES}, got {size}")
    stem = validate_key(image_key).rpartition(".")[0]
    return f"{stem}.thumb{size}.webp"


def is_thumbnail_key(key: str) -> bool:
    """Whether `key` names a thumbnail (derived data, never listed as an asset)."""
    return _THUMBNAIL_SUFFIX.search(key) is not None


def job_manifest_key(job_id: str) -> str:
    """Key of a job's manifest."""
    return job_prefix(job_id) + MANIFEST_NAME


def parse_job_manifest_key(key: str) -> str | None:
    """The job id when `key` is a job's manifest key, else None."""
    head, _, rest = key.partition("/")
    job_id, _, name = rest.partition("/")
    if head != JOBS_PREFIX or name != MANIFEST_NAME or not is_job_id(job_id):
        return None
    return job_id

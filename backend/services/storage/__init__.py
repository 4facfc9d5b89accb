"""The storage tier: one key layout, local disk and S3, behind small interfaces.

Everything outside this package imports from here. Read it in this order:
- `base`: the interface (`StorageBackend`) and the capabilities a backend may add (signing,
  pending uploads, local copies, health checks), speaking in keys, bytes and URLs;
- `factory`: `get_storage_backend(settings)`, the backend STORAGE_BACKEND selects;
- `keys`: the key layout every tier shares, checked before any I/O;
- `local`, `s3`, `write_through`: the backends (S3 mode writes through local disk, which is
  the cache and the fallback), with `pending` (uploads kept until S3 takes them) and
  `presign` (presigned GET URLs);
- `conditional`: records shared between processes, changed by compare-and-swap;
- `atomic`: atomic file writes; `errors`: the error hierarchy.
"""

from mv.ids import InvalidKeyError
from services.storage.atomic import is_temp_file, remove_abandoned_temp_files, sha256_file
from services.storage.base import (
    CachesSharedObjects,
    ChecksHealth,
    HasLocalCopies,
    HoldsPendingUploads,
    Merge,
    MergerFor,
    ObjectInfo,
    PresignedUrl,
    SignsExistingKeys,
    SignsKnownKeysWithoutIO,
    SignsUrls,
    StorageBackend,
    StoredObject,
    VersionedObject,
)
from services.storage.conditional import read_latest, update_object
from services.storage.errors import (
    ConcurrentUpdateError,
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
)
from services.storage.factory import get_storage_backend
from services.storage.keys import (
    CHARACTER_REFERENCES_PREFIX,
    IMAGE_CONTENT_TYPES,
    JOB_CHARACTER_REFERENCE_DIR,
    JOBS_PREFIX,
    MANIFEST_NAME,
    THUMBNAIL_SIZES,
    character_reference_key,
    character_reference_sidecar_key,
    is_thumbnail_key,
    job_asset_key,
    job_character_reference_key,
    job_manifest_key,
    job_prefix,
    normalize_image_extension,
    parse_job_manifest_key,
    thumbnail_key,
    validate_key,
)
from services.storage.local import LocalStorageBackend, content_type_for
from services.storage.s3 import S3StorageBackend, make_s3_client
from services.storage.write_through import KnownKeys, WriteThroughStorageBackend

__all__ = [
    "CHARACTER_REFERENCES_PREFIX",
    "IMAGE_CONTENT_TYPES",
    "JOBS_PREFIX",
    "JOB_CHARACTER_REFERENCE_DIR",
    "MANIFEST_NAME",
    "THUMBNAIL_SIZES",
    "CachesSharedObjects",
    "ChecksHealth",
    "ConcurrentUpdateError",
    "HasLocalCopies",
    "HoldsPendingUploads",
    "IntegrityError",
    "InvalidKeyError",
    "KnownKeys",
    "LocalStorageBackend",
    "Merge",
    "MergerFor",
    "ObjectInfo",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "PresignedUrl",
    "S3StorageBackend",
    "SignsExistingKeys",
    "SignsKnownKeysWithoutIO",
    "SignsUrls",
    "StorageBackend",
    "StorageError",
    "StorageUnavailableError",
    "StoredObject",
    "VersionedObject",
    "WriteThroughStorageBackend",
    "character_reference_key",
    "character_reference_sidecar_key",
    "content_type_for",
    "get_storage_backend",
    "is_temp_file",
    "is_thumbnail_key",
    "job_asset_key",
    "job_character_reference_key",
    "job_manifest_key",
    "job_prefix",
    "make_s3_client",
    "normalize_image_extension",
    "parse_job_manifest_key",
    "read_latest",
    "remove_abandoned_temp_files",
    "sha256_file",
    "thumbnail_key",
    "update_object",
    "validate_key",
]

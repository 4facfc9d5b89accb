"""Assets: character reference images and job directories, stored, served and deleted.

`AssetPersistenceService` is the one object routes and scripts hold; everything outside this
package imports from here. Read it top-down:
- `service`: the facade, the Python API (persist, associate, URL, persist and download a job
  directory) and delete, each a thin composition of the modules below;
- `references`: standalone character references: store an image with its sidecar, find it;
- `manifests`: job manifests, changed by a compare-and-swap merge;
- `job_references`: stored references copied under a job (and into a worker's directory);
- `job_directories`: a whole job directory uploaded, and restored with integrity checks;
- `urls`: the URL of a stored key (presigned, or the API path), and `signing`: signed API
  URLs that work without an API key;
- `delivery`: what a GET serves (a presigned URL, or the local copy) and `thumbnails`;
- `deletion` (in an order that is safe to repeat) and `retention` (unpicked candidates);
- `listing`: every owner's images in an index in the store, paged newest first;
- `records` (the sidecar and manifest models) and `images` (image formats from their bytes).
"""

from services.asset_persistence.delivery import CloudImage, ImageDelivery, LocalImageFile
from services.asset_persistence.images import (
    ImageKind,
    UnsupportedImageError,
    encode_image,
    fit_to_area,
    identify_image,
    verify_image,
)
from services.asset_persistence.listing import ListFilter
from services.asset_persistence.manifests import JobNotFoundError, merge_manifest
from services.asset_persistence.records import (
    CHARACTER_REFERENCES_CATEGORY,
    CharacterReferenceRecord,
    GenerationDetails,
    JobManifest,
    ManifestEntry,
    utc_now,
)
from services.asset_persistence.references import (
    CharacterReferenceNotFoundError,
    StoredCharacterReference,
)
from services.asset_persistence.retention import (
    CANDIDATES_PREFIX,
    LIFECYCLE_RULE_ID,
    SWEEP_INTERVAL_SECONDS,
    install_lifecycle_rule,
    lifecycle_problem,
    sweep_expired_candidates,
    sweep_forever,
)
from services.asset_persistence.service import AssetPersistenceService
from services.asset_persistence.signing import SignatureCheck, UrlSigner, url_signer
from services.asset_persistence.thumbnails import ThumbnailStore, render_thumbnail
from services.asset_persistence.urls import API_PREFIX

__all__ = [
    "API_PREFIX",
    "CANDIDATES_PREFIX",
    "CHARACTER_REFERENCES_CATEGORY",
    "LIFECYCLE_RULE_ID",
    "SWEEP_INTERVAL_SECONDS",
    "AssetPersistenceService",
    "CharacterReferenceNotFoundError",
    "CharacterReferenceRecord",
    "CloudImage",
    "GenerationDetails",
    "ImageDelivery",
    "ImageKind",
    "JobManifest",
    "JobNotFoundError",
    "ListFilter",
    "LocalImageFile",
    "ManifestEntry",
    "SignatureCheck",
    "StoredCharacterReference",
    "ThumbnailStore",
    "UnsupportedImageError",
    "UrlSigner",
    "encode_image",
    "fit_to_area",
    "identify_image",
    "install_lifecycle_rule",
    "lifecycle_problem",
    "merge_manifest",
    "render_thumbnail",
    "sweep_expired_candidates",
    "sweep_forever",
    "url_signer",
    "utc_now",
    "verify_image",
]

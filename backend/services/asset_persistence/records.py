"""Stored records: the character reference sidecar and the job manifest, as pydantic models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mv.ids import UuidText
from mv.replies import REPLY_CONFIG
from services.storage import (
    ObjectNotFoundError,
    StorageBackend,
    character_reference_sidecar_key,
    validate_key,
)

# The manifest category of a job's character references (other files: their top-level folder).
CHARACTER_REFERENCES_CATEGORY = "character_references"


def utc_now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class GenerationDetails(BaseModel):
    """How an image was made; written into its sidecar (all optional for uploaded images)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    model: str | None = None
    backend: Literal["worker", "local", "replicate", "upload"] | None = None
    fallback_reason: str | None = None
    # Lineage: the stored images this one was made from (the first is the identity), and
    # the named view it shows. The ids stay when those images are deleted.
    reference_image_ids: list[str] | None = None
    view: str | None = None
    # Who stored it (an API key's owner, a JWT's sub); None: stored with no authentication
    # on, or before owners existed.
    owner: str | None = None


class CharacterReferenceRecord(GenerationDetails):
    """The metadata sidecar stored at character_references/{image_id}.json."""

    model_config = REPLY_CONFIG  # also the reply of GET .../metadata

    id: UuidText
    width: int | None = None
    height: int | None = None
    content_type: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    created_at: datetime = Field(default_factory=utc_now)


def read_sidecar(storage: StorageBackend, image_id: str) -> CharacterReferenceRecord | None:
    """The sidecar of a standalone image, or None. Blocking."""
    try:
        raw = storage.get_bytes(character_reference_sidecar_key(image_id))
    except ObjectNotFoundError:
        return None
    return CharacterReferenceRecord.model_validate_json(raw)


class ManifestEntry(BaseModel):
    """One file of a job directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    category: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_type: str

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        # A manifest read back from storage decides where files are written: check it.
        return validate_key(value)


class JobManifest(BaseModel):
    """Every file of a job, stored at jobs/{job_id}/manifest.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    created_at: datetime = Field(default_factory=utc_now)
    files: list[ManifestEntry]

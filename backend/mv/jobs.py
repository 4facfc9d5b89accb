"""Video jobs: the records clients create, and the job with its assets as they read it."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mv.ids import JobIdText, UuidText, parse_image_id, parse_job_id
from mv.replies import Reply

MAX_METADATA_BYTES = 16 * 1024
MAX_IMAGES_PER_ATTACH = 16


class CreateJobRequest(BaseModel):
    """Body of POST /api/mv/jobs."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobIdText | None = Field(
        default=None, description="[A-Za-z0-9][A-Za-z0-9_-]{0,127}; generated when absent"
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description=f"any JSON object up to {MAX_METADATA_BYTES} bytes"
    )

    @field_validator("job_id")
    @classmethod
    def _valid_job_id(cls, value: str | None) -> str | None:
        return None if value is None else parse_job_id(value)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"must serialize to at most {MAX_METADATA_BYTES} bytes of JSON")
        return value


class AttachCharacterReferencesRequest(BaseModel):
    """Body of POST /api/mv/jobs/{job_id}/character_references."""

    model_config = ConfigDict(extra="forbid")

    image_ids: list[UuidText] = Field(min_length=1, max_length=MAX_IMAGES_PER_ATTACH)

    @field_validator("image_ids")
    @classmethod
    def _uuids(cls, value: list[str]) -> list[str]:
        ids = [parse_image_id(image_id) for image_id in value]
        return list(dict.fromkeys(ids))  # the same image twice is attached once


class JobRecord(BaseModel):
    """What is stored for a job created through the API."""

    job_id: str
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Who created it (None: no authentication, or created before owners existed).
    owner: str | None = None


class JobAsset(Reply):
    """One file of a job, from its manifest, with a URL that serves it."""

    path: str = Field(description="relative path inside the job directory")
    category: str
    size: int
    sha256: str
    content_type: str
    url: str
    image_id: UuidText | None = Field(default=None, description="for character references")
    thumbnail_url: str | None = Field(
        default=None, description="for character references: a WebP of at most 256 px"
    )


class Job(Reply):
    """A job and every asset its manifest lists."""

    job_id: JobIdText
    created_at: datetime | None
    metadata: dict[str, Any]
    character_references: list[JobAsset]
    assets: list[JobAsset]
    manifest_url: str | None


def new_job_id() -> str:
    """A fresh job id."""
    return uuid.uuid4().hex

"""Paged lists: the caller's images, jobs and generations, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from mv.generation_jobs import GenerationState
from mv.ids import JobIdText, UuidText
from mv.replies import Reply

NEXT_CURSOR_DESCRIPTION = "pass as `cursor` for the next page; null on the last page"


class CharacterReferenceListItem(Reply):
    """One stored character reference, as a gallery shows it."""

    id: UuidText
    url: str = Field(description="serves the image (a presigned URL in cloud serving)")
    thumbnail_url: str = Field(description="a WebP of at most 256 px")
    created_at: datetime
    character_description: str | None = Field(description="null for an uploaded image")
    seed: int | None
    width: int | None
    height: int | None
    content_type: str
    view: str | None = Field(description="the named view it shows, when made from references")
    reference_image_ids: list[UuidText] | None = Field(
        description="the images it was made from, the first the identity"
    )


class CharacterReferencePage(Reply):
    """A page of GET /api/mv/character_references."""

    items: list[CharacterReferenceListItem]
    next_cursor: str | None = Field(description=NEXT_CURSOR_DESCRIPTION)


class JobListItem(Reply):
    """One job created through the API."""

    job_id: JobIdText
    created_at: datetime
    metadata: dict[str, Any]


class JobPage(Reply):
    """A page of GET /api/mv/jobs."""

    items: list[JobListItem]
    next_cursor: str | None = Field(description=NEXT_CURSOR_DESCRIPTION)


class GenerationListItem(Reply):
    """One generation submitted through the API."""

    generation_id: UuidText
    status: GenerationState
    created_at: datetime
    finished_at: datetime | None
    status_url: str


class GenerationPage(Reply):
    """A page of GET /api/mv/character_reference_jobs; with a `status` filter a page may hold
    fewer than `limit` items (or none) and still have a next page."""

    items: list[GenerationListItem]
    next_cursor: str | None = Field(description=NEXT_CURSOR_DESCRIPTION)

"""Asynchronous generation: the request with its webhook, and the status clients poll."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mv.character_reference import (
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
)
from mv.errors import ErrorName
from mv.ids import UuidText
from mv.replies import REPLY_CONFIG, Reply

MAX_WEBHOOK_URL_CHARS = 2048
GenerationState = Literal["queued", "running", "succeeded", "failed", "canceled"]


class GenerationFailure(BaseModel):
    """Why a generation failed: the error name and message the sync route would have sent."""

    model_config = ConfigDict(extra="forbid", **REPLY_CONFIG)

    error: ErrorName
    message: str
    status_code: int = Field(ge=400, le=599)


class GenerationProgressInfo(Reply):
    """How far a running generation is: diffusion steps (local) or finished images (Replicate)."""

    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1)


class AsyncGenerateCharacterReferenceRequest(GenerateCharacterReferenceRequest):
    """Body of POST /api/mv/character_reference_jobs: the sync body, plus a webhook."""

    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description="called (signed, retried) when the generation finishes",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials")
        if parts.fragment:
            raise ValueError("must not have a fragment")
        return value

    def generation_request(self) -> GenerateCharacterReferenceRequest:
        """The part that describes the images (the sync route's body)."""
        return GenerateCharacterReferenceRequest(**self.model_dump(exclude={"webhook_url"}))


class WebhookDelivery(Reply):
    """What happened to a generation's webhook."""

    status: Literal["pending", "delivered", "failed", "refused"] = Field(
        description="pending while being sent or retried; refused: the receiver answered a "
        "4xx other than 408/425/429, or the destination is not allowed"
    )
    delivery_id: str = Field(description="the webhook-id header, the same on every attempt")
    attempts: int = Field(ge=0)
    last_error: str | None = Field(default=None, description="of the last failed attempt")


class GenerationStatus(Reply):
    """A generation as clients see it: reply of the status URL, and webhook payload."""

    generation_id: UuidText
    status: GenerationState
    status_url: str
    events_url: str = Field(
        description="its progress as Server-Sent Events; signed when the API needs keys, so "
        "a browser EventSource (which cannot send headers) opens it as it is"
    )
    queue_position: int | None = Field(
        default=None, description="1 = next to run; only while queued"
    )
    progress: GenerationProgressInfo | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: GenerateCharacterReferenceResponse | None = Field(
        default=None, description="exactly the sync route's reply, once succeeded"
    )
    error: GenerationFailure | None = None
    webhook: WebhookDelivery | None = Field(
        default=None, description="when a webhook_url was given, once the generation finished"
    )


class QueuedEvent(Reply):
    """The data of a `queued` event."""

    generation_id: UuidText
    status: Literal["queued"]
    queue_position: int | None = Field(
        description="1 = next to run; null when another replica holds the queue"
    )


class ProgressEvent(Reply):
    """The data of a `progress` event."""

    generation_id: UuidText
    status: Literal["running"]
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1)

"""Asynchronous generation: 202 and a status URL, polling, cancel, signed webhooks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from mv.generation_jobs import (
    AsyncGenerateCharacterReferenceRequest,
    GenerationState,
    GenerationStatus,
)
from mv.lists import GenerationPage
from routers.deps import (
    GenerationEventsDep,
    GenerationPolicyDep,
    GenerationsDep,
    IdempotencyKeyHeader,
    PrincipalDep,
)
from routers.mv import GENERATION_ERRORS
from routers.openapi.responses import (
    LOCATION,
    Responses,
    event_stream,
    signed_url_parameters,
)
from routers.paging import PageDep

router = APIRouter(prefix="/api/mv", tags=["asynchronous generation"])

GenerationId = Annotated[uuid.UUID, Path(description="the id POST returned")]
_NOT_FOUND: Responses = {404: {"description": "no such generation"}}


@router.post(
    "/character_reference_jobs",
    status_code=202,
    response_model=GenerationStatus,
    responses={
        202: {"headers": {"Location": LOCATION}},
        **GENERATION_ERRORS,
        422: {"description": "bad input; a webhook_url this server would not call"},
    },
)
async def submit_character_reference_job(
    body: AsyncGenerateCharacterReferenceRequest,
    response: Response,
    generations: GenerationsDep,
    policy: GenerationPolicyDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> GenerationStatus:
    """Queue a generation (the sync route's body, plus `webhook_url`); poll `status_url`."""
    policy.check_can_run(body.backend)  # refused now, not when a client polls
    policy.check_references(body.backend, len(body.reference_image_ids or ()))
    status = await generations.submit(body, idempotency_key, principal)
    response.headers["Location"] = status.status_url
    return status


@router.get("/character_reference_jobs", response_model=GenerationPage)
async def list_character_reference_jobs(
    page: PageDep,
    generations: GenerationsDep,
    status: Annotated[GenerationState | None, Query(description="only those in this state")] = None,
) -> GenerationPage:
    """Your generations (operators: `owner`'s), newest first, paged. With `status`, a page
    holds those of its entries in that state: maybe fewer than `limit`, or none, with more
    to follow in `next_cursor`."""
    return await generations.list_generations(page.owner, page.limit, page.cursor, status)


async def visible_generation(
    generation_id: GenerationId, generations: GenerationsDep, principal: PrincipalDep
) -> None:
    """A 404 before an event stream starts, for a generation the caller may not see."""
    await generations.check_visible(str(generation_id), principal)


@router.get(
    "/character_reference_jobs/{generation_id}/events",
    response_class=EventSourceResponse,
    dependencies=[Depends(visible_generation), Depends(signed_url_parameters)],
    responses={
        200: event_stream(
            {
                "queued": "QueuedEvent",
                "progress": "ProgressEvent",
                **dict.fromkeys(("succeeded", "failed", "canceled"), "GenerationStatus"),
            },
            "the generation's progress until it finishes",
        ),
        **_NOT_FOUND,
    },
)
async def stream_character_reference_job_events(
    generation_id: GenerationId,
    events: GenerationEventsDep,
    principal: PrincipalDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=64, description="resume after this event"),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: `queued` (with position), `progress` (step, total steps), then
    `succeeded`, `failed` or `canceled` with the status route's body, and the stream ends.
    A browser opens the signed `events_url` of the 202 reply as it is."""
    async for event in events.stream(str(generation_id), principal, last_event_id):
        if event.data is None:
            yield ServerSentEvent(comment=event.name)
        else:
            yield ServerSentEvent(event=event.name, id=event.id, data=event.data)


@router.get(
    "/character_reference_jobs/{generation_id}",
    response_model=GenerationStatus,
    responses=_NOT_FOUND,
)
async def get_character_reference_job(
    generation_id: GenerationId, generations: GenerationsDep, principal: PrincipalDep
) -> GenerationStatus:
    """queued (with queue_position), running (with progress), succeeded, failed or canceled."""
    return await generations.status(str(generation_id), principal)


@router.delete(
    "/character_reference_jobs/{generation_id}",
    response_model=GenerationStatus,
    responses={
        **_NOT_FOUND,
        202: {
            "description": "another replica runs it; it stops within a second or so",
            "model": GenerationStatus,
        },
        409: {"description": "it already succeeded or failed"},
    },
)
async def cancel_character_reference_job(
    generation_id: GenerationId,
    response: Response,
    generations: GenerationsDep,
    principal: PrincipalDep,
) -> GenerationStatus:
    """Cancel: a queued generation is dropped, a running one stops at its next step."""
    status = await generations.cancel(str(generation_id), principal)
    if status.status != "canceled":
        response.status_code = 202
    return status

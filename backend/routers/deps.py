"""FastAPI dependencies: the services the app factory built, as annotated aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError

from config import Settings
from mv.ids import InvalidKeyError, parse_image_id, parse_job_id
from mv.principals import PRINCIPAL, Principal
from observability import bind
from services.asset_persistence import AssetPersistenceService, ImageDelivery
from services.character_references import CharacterReferenceService
from services.generation.events import GenerationEvents
from services.generation.policy import GenerationPolicy
from services.generation.queue import GenerationQueue
from services.generation.service import GenerationService
from services.jobs import JobService
from services.metrics import Metrics
from services.storage import validate_key

# How each path id is checked: a bad one is a 422 naming it, before any handler runs.
# (generation_id is typed as a UUID in its routes, so FastAPI checks it.)
_PATH_ID_PARSERS: dict[str, Callable[[str], object]] = {
    "job_id": parse_job_id,
    "image_id": parse_image_id,
    "path": validate_key,
}


async def check_path_ids(request: Request) -> None:
    """Refuse malformed ids in the path (422 naming the parameter), then put the job and
    generation ids on the request's log lines."""
    params = request.path_params
    errors = []
    for name, parse in _PATH_ID_PARSERS.items():
        if name not in params:
            continue
        try:
            parse(params[name])
        except InvalidKeyError as error:
            errors.append(
                {"type": "value_error", "loc": ("path", name), "msg": str(error), "input": None}
            )
    if errors:
        raise RequestValidationError(errors)
    bind(job_id=params.get("job_id"), generation_id=params.get("generation_id"))


# The getters are `async def` on purpose: FastAPI runs a plain `def` dependency on a worker
# thread, which would cost every request a thread hop per service it uses.


async def get_principal(request: Request) -> Principal:
    """Who the request is (AuthMiddleware put it in the request's state)."""
    return request.scope["state"][PRINCIPAL]


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


async def get_assets(request: Request) -> AssetPersistenceService:
    """The app's AssetPersistenceService."""
    return request.app.state.assets


async def get_character_references(request: Request) -> CharacterReferenceService:
    """The app's CharacterReferenceService."""
    return request.app.state.character_references


async def get_generation_policy(request: Request) -> GenerationPolicy:
    """The app's GenerationPolicy."""
    return request.app.state.generation


async def get_image_delivery(request: Request) -> ImageDelivery:
    """The ImageDelivery of the app's AssetPersistenceService."""
    return request.app.state.assets.delivery


async def get_generation_queue(request: Request) -> GenerationQueue:
    """The app's GenerationQueue."""
    return request.app.state.generation_queue


async def get_generations(request: Request) -> GenerationService:
    """The app's GenerationService."""
    return request.app.state.generations


async def get_generation_events(request: Request) -> GenerationEvents:
    """The app's GenerationEvents."""
    return request.app.state.generation_events


async def get_jobs(request: Request) -> JobService:
    """The app's JobService."""
    return request.app.state.jobs


async def get_metrics(request: Request) -> Metrics:
    """The app's Metrics."""
    return request.app.state.metrics


PrincipalDep = Annotated[Principal, Depends(get_principal)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
AssetsDep = Annotated[AssetPersistenceService, Depends(get_assets)]
CharacterReferencesDep = Annotated[CharacterReferenceService, Depends(get_character_references)]
GenerationPolicyDep = Annotated[GenerationPolicy, Depends(get_generation_policy)]
ImageDeliveryDep = Annotated[ImageDelivery, Depends(get_image_delivery)]
GenerationQueueDep = Annotated[GenerationQueue, Depends(get_generation_queue)]
GenerationsDep = Annotated[GenerationService, Depends(get_generations)]
GenerationEventsDep = Annotated[GenerationEvents, Depends(get_generation_events)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="the same key and body give the same result; another body gets 422",
    ),
]

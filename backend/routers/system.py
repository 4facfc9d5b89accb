"""Operational endpoints: liveness, readiness, version and Prometheus metrics."""

from __future__ import annotations

import asyncio
import platform
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from mv.replies import Reply
from routers.deps import AssetsDep, GenerationPolicyDep, MetricsDep
from services.storage import ChecksHealth
from version import __version__

router = APIRouter(tags=["system"])
STORAGE_CHECK_SECONDS = 5.0


class Health(Reply):
    """Liveness: the process is up and serving requests."""

    status: str = "ok"


class Readiness(Reply):
    """Whether the server can do its work, what is missing when it cannot, and what works but
    is degraded."""

    status: Literal["ready", "degraded", "not ready"]
    problems: list[str]
    warnings: list[str] = []
    reference_images: dict[str, int | None] = Field(
        default={},
        description="per configured generator, how many reference images a request may bring "
        "(0: text-to-image only; null: not known until its model loads)",
    )


class VersionInfo(Reply):
    """What is running."""

    name: str
    version: str
    python: str


@router.get("/health")
async def health() -> Health:
    """Liveness probe: 200 while the process serves requests."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(policy: GenerationPolicyDep, assets: AssetsDep) -> JSONResponse:
    """Readiness probe: a generator can run (worker tier ready, model loaded, or Replicate
    configured) and the storage answers; 503 listing what is missing otherwise. A server that
    works but falls back (worker tier down, GPU out of memory again and again) answers 200
    `degraded`, with warnings."""
    readiness = await policy.readiness()
    problems = readiness.problems
    storage = assets.storage
    if isinstance(storage, ChecksHealth):
        try:
            async with asyncio.timeout(STORAGE_CHECK_SECONDS):
                await asyncio.to_thread(storage.check)
        except TimeoutError:
            problems.append(f"storage: no answer within {STORAGE_CHECK_SECONDS:g} s")
        except Exception as error:
            problems.append(f"storage: {error}")
    warnings = readiness.warnings
    references = policy.reference_support()
    if problems:
        reply = Readiness(
            status="not ready", problems=problems, warnings=warnings, reference_images=references
        )
        return JSONResponse(reply.model_dump(), 503)
    status = "degraded" if warnings else "ready"
    reply = Readiness(status=status, problems=[], warnings=warnings, reference_images=references)
    return JSONResponse(reply.model_dump())


@router.get("/version")
async def version() -> VersionInfo:
    """The backend's name and version."""
    return VersionInfo(name="mv-backend", version=__version__, python=platform.python_version())


@router.get("/metrics", response_class=Response)
def metrics(registry: MetricsDep) -> Response:
    """Prometheus metrics (a plain function: gauges read from disk run on a worker thread)."""
    return Response(registry.render(), media_type=registry.content_type)

"""Operational endpoints: liveness and version."""

from __future__ import annotations

import platform

from fastapi import APIRouter
from pydantic import BaseModel

from version import __version__

router = APIRouter(tags=["system"])


class Health(BaseModel):
    """Liveness: the process is up and serving requests."""

    status: str = "ok"


class VersionInfo(BaseModel):
    """What is running."""

    name: str
    version: str
    python: str


@router.get("/health")
async def health() -> Health:
    """Liveness probe: 200 while the process serves requests."""
    return Health()


@router.get("/version")
async def version() -> VersionInfo:
    """The backend's name and version."""
    return VersionInfo(name="mv-backend", version=__version__, python=platform.python_version())

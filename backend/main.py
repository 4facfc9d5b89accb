"""The FastAPI application: `create_app(settings)`, and `app` for uvicorn (`uvicorn main:app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from config import Settings, SettingsError, get_settings
from routers import mv, system
from routers.errors import install_error_handlers
from services.asset_persistence import AssetPersistenceService
from services.character_references import CharacterReferenceService
from services.generation.policy import GenerationPolicy
from services.image_delivery import ImageDelivery
from services.image_generation import build_generation_policy
from services.storage_backend import StorageBackend, get_storage_backend
from version import __version__

logger = logging.getLogger(__name__)


async def retry_pending_uploads_forever(service: AssetPersistenceService, interval: float) -> None:
    """Upload what S3 refused earlier: once at start-up, then every `interval` seconds."""
    while True:
        try:
            await service.retry_pending_uploads()
        except Exception:  # the loop must outlive any single failure
            logger.exception("retrying pending uploads failed")
        await asyncio.sleep(interval)


def create_app(
    settings: Settings | None = None,
    *,
    storage_backend: StorageBackend | None = None,
    generation_policy: GenerationPolicy | None = None,
) -> FastAPI:
    """Build the application; services are created once, when it starts.

    `storage_backend` and `generation_policy` replace the ones settings would build (tests,
    embedding); the app then leaves closing them to the caller.
    """
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = storage_backend or get_storage_backend(settings)
        assets = AssetPersistenceService(storage, settings=settings)
        policy = generation_policy or build_generation_policy(settings)
        policy.start()  # the local model loads in the background; requests wait for it
        app.state.settings = settings
        app.state.assets = assets
        app.state.generation = policy
        app.state.character_references = CharacterReferenceService(assets, policy)
        app.state.delivery = ImageDelivery(assets)
        retrier = asyncio.create_task(
            retry_pending_uploads_forever(assets, settings.pending_upload_retry_seconds)
        )
        try:
            yield
        finally:
            retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrier
            if generation_policy is None:
                await policy.aclose()
            if storage_backend is None:
                await asyncio.to_thread(storage.close)

    app = FastAPI(
        title="Music-video backend",
        version=__version__,
        description="Character reference images, their storage, and video-job assets.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(mv.router)
    return app


def _app_from_environment() -> FastAPI:
    try:
        return create_app()
    except SettingsError as error:
        # A clear one-line reason beats a traceback when the server refuses to start.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_from_environment()

"""The FastAPI application: `create_app(settings)`, and `app` for uvicorn (`uvicorn main:app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from config import Settings, SettingsError, get_settings
from routers import system
from services.asset_persistence import AssetPersistenceService
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
    settings: Settings | None = None, *, storage_backend: StorageBackend | None = None
) -> FastAPI:
    """Build the application; services are created once, when it starts."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = storage_backend or get_storage_backend(settings)
        assets = AssetPersistenceService(storage, settings=settings)
        app.state.settings = settings
        app.state.assets = assets
        retrier = asyncio.create_task(
            retry_pending_uploads_forever(assets, settings.pending_upload_retry_seconds)
        )
        try:
            yield
        finally:
            retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrier
            if storage_backend is None:
                await asyncio.to_thread(storage.close)

    app = FastAPI(
        title="Music-video backend",
        version=__version__,
        description="Character reference images, their storage, and video-job assets.",
        lifespan=lifespan,
    )
    app.include_router(system.router)
    return app


def _app_from_environment() -> FastAPI:
    try:
        return create_app()
    except SettingsError as error:
        # A clear one-line reason beats a traceback when the server refuses to start.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_from_environment()

"""The FastAPI application: `create_app(settings)`, and `app` for uvicorn (`uvicorn main:app`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from config import Settings, get_settings, settings_or_exit
from middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    JsonCORSMiddleware,
    RequestContextMiddleware,
)
from observability import configure_logging
from routers import debug, generations, jobs, mv, openapi, system
from routers.deps import check_path_ids
from routers.errors import classify_error, install_error_handlers
from routers.upload_limits import MAX_JSON_BODY_BYTES, UPLOAD_PATH
from services.asset_persistence import (
    SWEEP_INTERVAL_SECONDS,
    AssetPersistenceService,
    sweep_forever,
    url_signer,
)
from services.auth import Authenticator, JwtVerifier
from services.character_references import CharacterReferenceService
from services.generation.events import GenerationEvents
from services.generation.policy import GenerationPolicy, build_generation_policy
from services.generation.queue import GenerationQueue
from services.generation.records import GenerationRecordStore
from services.generation.service import GenerationService
from services.idempotency import IdempotencyStore
from services.jobs import JobService
from services.metrics import Metrics
from services.storage import (
    LocalStorageBackend,
    StorageBackend,
    get_storage_backend,
    remove_abandoned_temp_files,
)
from services.webhooks import WebhookSender
from version import __version__

logger = logging.getLogger(__name__)
STUDIO_DIR = Path(__file__).resolve().parent / "studio"
CORS_REQUEST_HEADERS = [
    "Content-Type",
    "X-API-Key",
    "Idempotency-Key",
    "X-Request-ID",
    "If-None-Match",
    "Range",
]
CORS_EXPOSED_HEADERS = [
    "X-Request-ID",
    "X-Generation-Id",
    "Retry-After",
    "Location",
    "ETag",
    "Content-Range",
]


async def retry_pending_uploads_forever(service: AssetPersistenceService, interval: float) -> None:
    """Upload what S3 refused earlier: once at start-up, then every `interval` seconds."""
    while True:
        try:
            await service.retry_pending_uploads()
        except Exception:  # the loop must outlive any single failure
            logger.exception("retrying pending uploads failed")
        await asyncio.sleep(interval)


async def catch_up_on_deletes_forever(service: AssetPersistenceService, interval: float) -> None:
    """Apply the other replicas' deletes to this replica's caches every `interval` seconds."""
    while True:
        await asyncio.sleep(interval)
        try:
            await service.catch_up_on_deletes()
        except Exception as error:  # S3 unreachable, say: the next poll reads from the same point
            logger.warning("reading the other replicas' deletes failed: %s", error)


async def remove_abandoned_writes(root: Path) -> None:
    """Delete the temp files a killed process left in the local tier (in the background)."""
    try:
        removed = await asyncio.to_thread(remove_abandoned_temp_files, root)
    except OSError:
        logger.exception("removing abandoned temp files under %s failed", root)
        return
    if removed:
        logger.warning("removed %d temp file(s) left by interrupted writes", len(removed))


def create_app(
    settings: Settings | None = None,
    *,
    storage_backend: StorageBackend | None = None,
    generation_policy: GenerationPolicy | None = None,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    configure_logs: bool = False,
) -> FastAPI:
    """Build the application; services are created once, when it starts.

    `storage_backend` and `generation_policy` replace the ones settings would build (tests,
    embedding); the app then leaves closing them to the caller. With `configure_logs`, the
    process's logging is set up (LOG_FORMAT, LOG_LEVEL) now: a server that imports `main:app`
    (uvicorn, gunicorn's uvicorn workers) writes its next line, and every later one, so.
    """
    settings = settings or get_settings()
    metrics = Metrics()
    if configure_logs:
        configure_logging(settings.log_format, settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = storage_backend or get_storage_backend(settings, observe=metrics.observe_storage)
        assets = AssetPersistenceService(
            storage,
            settings=settings,
            on_conflict=metrics.manifest_conflicts.inc,
        )
        policy = generation_policy or build_generation_policy(settings)
        policy.start()  # the local model loads in the background; requests wait for it
        webhooks = _webhook_sender(settings, metrics, webhook_transport)
        idempotency = IdempotencyStore(storage)
        character_references = CharacterReferenceService(assets, policy)
        queue = GenerationQueue(
            character_references.generate,
            GenerationRecordStore(storage, settings.instance_name),
            classify_error=classify_error,
            metrics=metrics,
            webhooks=webhooks,
            max_queued=settings.max_queued_generations,
            workers=settings.effective_generation_workers,
            shedding_deadline_seconds=settings.generation_timeout_seconds,
        )
        await queue.start()
        metrics.watch(metrics.pending_uploads, lambda: len(list(assets.pending_uploads())))
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.assets = assets
        app.state.generation = policy
        app.state.generation_queue = queue
        app.state.character_references = character_references
        app.state.jobs = jobs = JobService(assets, idempotency)
        app.state.generations = generation_service = GenerationService(
            queue,
            assets,
            idempotency,
            jobs,
            webhooks=webhooks,
            public_base_url=settings.public_base_url,
            replay_timeout_seconds=settings.generation_timeout_seconds,
        )
        app.state.generation_events = GenerationEvents(
            generation_service, heartbeat=settings.events_heartbeat_seconds
        )
        retrier = asyncio.create_task(
            retry_pending_uploads_forever(assets, settings.pending_upload_retry_seconds)
        )
        sweeper = asyncio.create_task(remove_abandoned_writes(settings.output_dir))
        background = [retrier, sweeper]
        if assets.shared_deletes is not None:
            # Before the first request: a restarted replica may hold copies deleted meanwhile.
            try:
                await assets.catch_up_on_deletes()
            except Exception as error:
                logger.warning("reading the other replicas' deletes failed: %s", error)
            background.append(
                asyncio.create_task(
                    catch_up_on_deletes_forever(assets, settings.delete_poll_seconds)
                )
            )
        if settings.candidate_retention_days is not None:
            background.append(
                asyncio.create_task(
                    sweep_forever(
                        LocalStorageBackend(settings.output_dir),
                        settings.candidate_retention_days,
                        SWEEP_INTERVAL_SECONDS,
                    )
                )
            )
        # The imports (torch, diffusers) leave millions of long-lived objects; freezing them
        # keeps every later full garbage collection from walking them again mid-request.
        gc.freeze()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await queue.aclose()
            if webhooks is not None:
                await webhooks.aclose()
            if generation_policy is None:
                await policy.aclose()
            if storage_backend is None:
                await asyncio.to_thread(storage.close)

    # /docs and /redoc load their scripts from a package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="Music-video backend",
        version=__version__,
        description="Character reference images, their storage, video jobs and their assets.",
        lifespan=lifespan,
        **openapi.DOCUMENT_OPTIONS,
        # The backend exports Prometheus metrics and JSON logs of its own and sets up no
        # OpenTelemetry provider; FastAPI's bridge to one would still ask on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    openapi.install(app, settings.public_base_url)
    # Path ids are checked before any route runs, and bound to the request's log lines.
    api_dependencies = [Depends(check_path_ids)]
    app.include_router(system.router)
    # The studio: a page to try the API in a browser (plain files, no build step, no CDN).
    app.mount("/studio", StaticFiles(directory=STUDIO_DIR, html=True), name="studio")
    api_routers = [mv.router, generations.router, jobs.router]
    if settings.debug_endpoints:
        api_routers.append(debug.router)
    for router in api_routers:
        app.include_router(router, dependencies=api_dependencies)
    # In front of every route: the image GETs' express routes (routers/express.py).
    app.router.routes[:0] = mv.EXPRESS_ROUTES
    # Added innermost first: the request context wraps CORS, which wraps the key check.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=MAX_JSON_BODY_BYTES, own_limit_paths={UPLOAD_PATH}
    )
    # Always: without authentication every request is the one principal (Principal.everyone).
    app.add_middleware(AuthMiddleware, authenticator=_authenticator(settings))
    origins = settings.cors_origin_list
    if origins:
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=origins,
            allow_credentials=origins != ["*"],  # never credentials with a wildcard
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def _authenticator(settings: Settings) -> Authenticator:
    verifier = None
    if settings.auth_jwks_url and settings.auth_issuer and settings.auth_audience:
        verifier = JwtVerifier(settings.auth_jwks_url, settings.auth_issuer, settings.auth_audience)
    return Authenticator(
        settings.api_key_owners, settings.admin_key_owners, verifier, url_signer(settings)
    )


def _webhook_sender(
    settings: Settings, metrics: Metrics, transport: httpx.AsyncBaseTransport | None
) -> WebhookSender | None:
    if settings.webhook_secret is None:
        return None
    return WebhookSender(
        settings.webhook_secret.get_secret_value(),
        max_attempts=settings.webhook_max_attempts,
        timeout_seconds=settings.webhook_timeout_seconds,
        backoff_base=settings.webhook_retry_base_seconds,
        allow_private_networks=settings.webhook_allow_private_networks,
        allow_http=settings.webhook_allow_http,
        transport=transport,
        on_outcome=lambda outcome: metrics.webhooks.labels(outcome).inc(),
    )


app = create_app(settings_or_exit(), configure_logs=True)

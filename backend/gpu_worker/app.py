"""The worker app's builder: `gpu_worker.app:build_app`, for `serve run`, `serve deploy` and
`make worker`.

Settings come from the environment, as the API's do (LOCAL_MODEL_ID, LOCAL_DEVICE,
WORKER_TOKEN, WORKER_MAX_BATCH_IMAGES, WORKER_BATCH_WAIT_SECONDS, WORKER_MAX_QUEUED_REQUESTS);
a Serve config's `args:` may set any of them per application, and its `deployments:` section
may override the deployment options set here (replicas, autoscaling, GPUs, queue limits).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from config import MIN_API_KEY_CHARS, Settings, SettingsError, load_settings
from gpu_worker.deployments import DiffusionWorker, WorkerIngress
from mv.character_reference import MAX_IMAGES_PER_REQUEST
from services.generation.diffusion import DeviceSetting


class WorkerArgs(BaseModel):
    """`args:` of a Serve config file; each one left out comes from the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_model_id: str | None = Field(default=None, min_length=1)
    local_device: DeviceSetting | None = None
    worker_max_batch_images: int | None = Field(default=None, ge=MAX_IMAGES_PER_REQUEST, le=64)
    worker_batch_wait_seconds: float | None = Field(default=None, ge=0, le=10)
    worker_max_queued_requests: int | None = Field(default=None, ge=1, le=10_000)


def build_app(
    args: dict[str, Any] | None = None, *, settings: Settings | None = None
) -> Application:
    """The worker app, from the settings (the environment's, unless given) and `args` over
    them; SettingsError naming what is wrong."""
    overrides = WorkerArgs.model_validate(args or {}).model_dump(exclude_none=True)
    if settings is None:
        settings = load_settings(**overrides)
    else:
        settings = settings.model_copy(update=overrides)
    if settings.worker_token is None:
        raise SettingsError(
            f"WORKER_TOKEN must be set ({MIN_API_KEY_CHARS}+ characters): API replicas send it "
            "to the worker tier, which refuses requests without it"
        )
    max_batch_images = settings.worker_max_batch_images
    worker = DiffusionWorker.options(
        # One batch running and one forming: enough requests on a replica to fill a batch.
        max_ongoing_requests=2 * max_batch_images,
        max_queued_requests=settings.worker_max_queued_requests,
        # A model that does not load fails the same way again: give up after a few tries.
        max_constructor_retry_count=3,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0 if settings.local_device == "cpu" else 1},
        user_config={
            "max_batch_images": max_batch_images,
            "batch_wait_seconds": settings.worker_batch_wait_seconds,
        },
    ).bind(settings.local_model_id, settings.local_device)
    return WorkerIngress.bind(worker, settings.worker_token.get_secret_value())

"""GET /api/mv/config/debug: effective non-secret settings; mounted only with DEBUG_ENDPOINTS."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter

from routers.deps import GenerationPolicyDep, GenerationQueueDep, SettingsDep

router = APIRouter(prefix="/api/mv", tags=["debug"])


# An operator's page, mounted only with DEBUG_ENDPOINTS: not in the document, which is the
# same whatever the configuration.
@router.get("/config/debug", include_in_schema=False)
async def config_debug(
    settings: SettingsDep, policy: GenerationPolicyDep, queue: GenerationQueueDep
) -> dict[str, Any]:
    """Effective non-secret settings and which generators are available. Never secrets."""
    endpoint = settings.aws_endpoint_url
    return {
        "storage_backend": settings.storage_backend,
        "storage_bucket": settings.storage_bucket,
        "serve_from_cloud": settings.serve_from_cloud,
        "presigned_url_expiry": settings.presigned_url_expiry,
        "aws_region": settings.aws_region,
        "aws_endpoint_host": urlsplit(endpoint).hostname if endpoint else None,
        "public_base_url": settings.public_base_url,
        "image_generator": settings.image_generator,
        "local_model_id": settings.local_model_id,
        "local_device": settings.local_device,
        "replicate_model": settings.effective_replicate_model,
        "replicate_reference_model": settings.replicate_reference_model,
        "replicate_configured": settings.replicate_api_token is not None,
        "worker_url": settings.worker_url,
        "worker_token_set": settings.worker_token is not None,
        "overflow_to_replicate": settings.overflow_to_replicate,
        "generation": policy.describe(),
        "queue": {
            "max_queued": queue.max_queued,
            "waiting": queue.depth,
            "workers": queue.workers,
        },
        "api_keys_required": settings.authentication_enabled,
        "operator_keys": len(settings.admin_key_owners),
        "bearer_tokens": {"issuer": settings.auth_issuer, "audience": settings.auth_audience}
        if settings.auth_jwks_url
        else None,
        "webhooks_enabled": settings.webhook_secret is not None,
        "instance_name": settings.instance_name,
    }

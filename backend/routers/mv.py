"""The /api/mv endpoints: generate, upload and serve character references."""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.datastructures import UploadFile

from mv.character_reference import (
    MAX_DESCRIPTION_CHARS,
    CloudImageLocation,
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
    UploadedCharacterReference,
)
from routers.deps import (
    AssetsDep,
    CharacterReferencesDep,
    GenerationPolicyDep,
    ImageDeliveryDep,
    SettingsDep,
)
from routers.upload_limits import MAX_UPLOAD_BYTES, MULTIPART_OVERHEAD, capped_request, too_large
from services.asset_records import CharacterReferenceRecord
from services.image_delivery import LocalImageFile

router = APIRouter(prefix="/api/mv", tags=["character references"])

ImageId = Annotated[uuid.UUID, Path(description="the image's UUID")]

IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no image with this id"},
    503: {"description": "storage unreachable and no local copy"},
}
_GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {"description": "the generation queue is full; see Retry-After"},
    502: {"description": "the provider failed after retries, or sent an unusable image"},
    503: {"description": "no generator is available; the message says what to configure"},
    504: {"description": "generation did not finish within GENERATION_TIMEOUT_SECONDS"},
}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "character_description": {
                            "type": "string",
                            "maxLength": MAX_DESCRIPTION_CHARS,
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/generate_character_reference",
    response_model=GenerateCharacterReferenceResponse,
    responses=_GENERATION_ERRORS,
)
async def generate_character_reference(
    body: GenerateCharacterReferenceRequest, service: CharacterReferencesDep
) -> GenerateCharacterReferenceResponse:
    """Generate 1-4 candidate character reference images; each is stored before the reply."""
    return await service.generate(body)


@router.api_route("/get_character_reference/{image_id}", methods=["GET", "HEAD"], responses=_ERRORS)
async def get_character_reference(
    image_id: ImageId,
    request: Request,
    delivery: ImageDeliveryDep,
    redirect: Annotated[bool, Query(description="307 to the presigned URL")] = False,
) -> Response:
    """A stored image: its presigned S3 URL (JSON, or a 307 redirect) or its bytes."""
    image = await delivery.locate(str(image_id))
    if isinstance(image, LocalImageFile):
        return image_file_response(request, image)
    if redirect:
        return RedirectResponse(image.url.url, status_code=307)
    location = CloudImageLocation(
        image_id=str(image_id),
        image_url=image.url.url,
        expires_in_seconds=image.url.expires_in,
        expires_at=image.url.expires_at,
        cloud_path=image.key,
        content_type=image.content_type,
    )
    return JSONResponse(location.model_dump(mode="json"))


def image_file_response(request: Request, image: LocalImageFile) -> Response:
    """The file with validators and caching headers; 304 when the client's copy is current."""
    headers = {"Cache-Control": IMMUTABLE_CACHE, "X-Content-Type-Options": "nosniff"}
    if image.etag is not None:
        headers["ETag"] = image.etag
        if image.etag in _entity_tags(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
    return FileResponse(image.path, media_type=image.content_type, headers=headers)


def _entity_tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


@router.post(
    "/upload_character_reference",
    status_code=201,
    response_model=UploadedCharacterReference,
    openapi_extra=_UPLOAD_BODY,
    responses={
        413: {"description": "the file is larger than 10 MB"},
        415: {"description": "not a PNG, JPEG or WebP image"},
    },
)
async def upload_character_reference(
    request: Request, service: CharacterReferencesDep
) -> UploadedCharacterReference:
    """Store a user's own image (multipart field `file`, at most 10 MB, PNG/JPEG/WebP)."""
    capped = capped_request(request, MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD)
    async with capped.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _form_error("file", "a file is required in the multipart field 'file'")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        description = form.get("character_description")
    if len(data) > MAX_UPLOAD_BYTES:
        raise too_large(MAX_UPLOAD_BYTES)
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
    ):
        raise _form_error("character_description", f"at most {MAX_DESCRIPTION_CHARS} characters")
    return await service.upload(data, (description or "").strip() or None)


def _form_error(field: str, message: str) -> HTTPException:
    """A 422 naming the form field, shaped like FastAPI's own validation errors."""
    return HTTPException(422, [{"type": "value_error", "loc": ["body", field], "msg": message}])


@router.get(
    "/character_references/{image_id}/metadata",
    response_model=CharacterReferenceRecord,
    responses=_ERRORS,
)
async def get_character_reference_metadata(
    image_id: ImageId, assets: AssetsDep
) -> CharacterReferenceRecord:
    """The image's metadata sidecar: how it was made, its size, type and sha256."""
    return await assets.get_character_reference_record(str(image_id))


@router.get("/config/debug")
async def config_debug(settings: SettingsDep, policy: GenerationPolicyDep) -> dict[str, Any]:
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
        "replicate_model": settings.replicate_model,
        "replicate_configured": settings.replicate_api_token is not None,
        "generation": policy.describe(),
    }

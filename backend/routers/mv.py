"""The /api/mv endpoints: generate, upload and serve character references."""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.datastructures import UploadFile

from mv.character_reference import (
    MAX_DESCRIPTION_CHARS,
    CloudImageLocation,
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
    UploadedCharacterReference,
)
from mv.ids import JOB_ID_PATTERN
from mv.lists import CharacterReferencePage
from routers.deps import (
    AssetsDep,
    CharacterReferencesDep,
    GenerationPolicyDep,
    GenerationsDep,
    IdempotencyKeyHeader,
    ImageDeliveryDep,
    JobsDep,
    PrincipalDep,
    get_image_delivery,
    get_principal,
)
from routers.errors import FieldError
from routers.express import UUID_PATTERN, ExpressRoute, service
from routers.openapi.responses import (
    GENERATION_ID,
    IMAGE_TYPES,
    Responses,
    conditional_range_headers,
    served_file,
    signed_url_parameters,
)
from routers.paging import PageDep
from routers.serving import stored_file_response
from routers.upload_limits import MAX_UPLOAD_BYTES, MULTIPART_OVERHEAD, capped_request, too_large
from services.asset_persistence import (
    CharacterReferenceNotFoundError,
    CharacterReferenceRecord,
    CloudImage,
    ListFilter,
)

router = APIRouter(prefix="/api/mv", tags=["character references"])

ImageId = Annotated[uuid.UUID, Path(description="the image's UUID")]


class ThumbnailSize(IntEnum):
    """Long side of a thumbnail, in px (the sizes in services.storage.keys.THUMBNAIL_SIZES)."""

    SMALL = 256
    LARGE = 512


Size = Annotated[ThumbnailSize, Path(description="long side in px: 256 or 512")]
THUMBNAIL_RESPONSES: Responses = {
    **served_file(("image/webp",), cloud_model=None, what="thumbnail"),
    415: {"description": "the stored file is not an image that can be thumbnailed"},
}
# The parameters of every route that serves a stored file.
SERVED_FILE_PARAMETERS = [Depends(signed_url_parameters), Depends(conditional_range_headers)]

_UNREACHABLE: Responses = {
    503: {"description": "storage unreachable; nothing was lost, try again"},
}
_ERRORS: Responses = {
    404: {"description": "no image with this id"},
    503: {"description": "storage unreachable and no local copy"},
}
GENERATION_ERRORS: Responses = {
    404: {"description": "a reference_image_ids entry or the job_id names nothing stored"},
    409: {"description": "the Idempotency-Key is in use by a request still running"},
    429: {"description": "the generation queue (or the worker tier's) is full; see Retry-After"},
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
    responses={200: {"headers": {"X-Generation-Id": GENERATION_ID}}, **GENERATION_ERRORS},
)
async def generate_character_reference(
    body: GenerateCharacterReferenceRequest,
    response: Response,
    generations: GenerationsDep,
    policy: GenerationPolicyDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> GenerateCharacterReferenceResponse:
    """Generate 1-4 candidate character reference images (or one per view), from the
    description alone or from stored reference images; each is stored before the reply.

    `X-Generation-Id` names the generation (the same for a replay of an Idempotency-Key).
    """
    policy.check_offered(body.backend)
    policy.check_references(body.backend, len(body.reference_image_ids or ()))
    generation_id, reply = await generations.generate_now(body, idempotency_key, principal)
    response.headers["X-Generation-Id"] = generation_id
    return reply


@router.get(
    "/get_character_reference/{image_id}",
    response_class=Response,
    responses=served_file(IMAGE_TYPES, cloud_model=CloudImageLocation, what="image"),
    dependencies=SERVED_FILE_PARAMETERS,
)
@router.head("/get_character_reference/{image_id}", include_in_schema=False)
async def get_character_reference(
    image_id: ImageId,
    request: Request,
    delivery: ImageDeliveryDep,
    principal: PrincipalDep,
    redirect: Annotated[bool, Query(description="307 to the presigned URL")] = False,
) -> Response:
    """A stored image: its presigned S3 URL (JSON, or a 307 redirect) or its bytes."""
    located = await delivery.locate(str(image_id), principal)
    return await stored_file_response(
        request, located, redirect=redirect, cloud_reply=cloud_location
    )


@router.get(
    "/character_references/{image_id}/thumbnail/{size}",
    responses=THUMBNAIL_RESPONSES,
    response_class=Response,
    dependencies=SERVED_FILE_PARAMETERS,
)
@router.head("/character_references/{image_id}/thumbnail/{size}", include_in_schema=False)
async def get_character_reference_thumbnail(
    image_id: ImageId,
    size: Size,
    request: Request,
    delivery: ImageDeliveryDep,
    principal: PrincipalDep,
) -> Response:
    """The image as a WebP of at most `size` px on its long side (made on first request);
    in cloud serving, a 307 to its presigned URL."""
    found = await delivery.find(str(image_id), principal)
    missing = CharacterReferenceNotFoundError(str(image_id))
    located = await delivery.locate_thumbnail(found.key, found.sha256, size, missing)
    return await stored_file_response(request, located, redirect=True, cloud_reply=cloud_location)


@router.get(
    "/character_references",
    response_model=CharacterReferencePage,
    responses={404: {"description": "`job_id` names no job of yours"}},
)
async def list_character_references(
    page: PageDep,
    assets: AssetsDep,
    jobs: JobsDep,
    principal: PrincipalDep,
    job_id: Annotated[
        str | None, Query(pattern=JOB_ID_PATTERN, description="only those given to this job")
    ] = None,
    reference_image_id: Annotated[
        uuid.UUID | None, Query(description="only those made from this image")
    ] = None,
) -> CharacterReferencePage:
    """Your stored character references (operators: `owner`'s), newest first, paged."""
    if job_id is not None and reference_image_id is not None:
        raise FieldError(("query", "reference_image_id"), "filter by job_id or by this, not both")
    if job_id is not None:
        await jobs.check_visible(job_id, principal)
    reference = str(reference_image_id) if reference_image_id is not None else None
    which = ListFilter(reference_image_id=reference, job_id=job_id)
    return await assets.list_character_references(page.owner, which, page.limit, page.cursor)


@router.delete(
    "/character_references/{image_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"description": "no image with this id"}, **_UNREACHABLE},
)
async def delete_character_reference(
    image_id: ImageId, assets: AssetsDep, principal: PrincipalDep
) -> Response:
    """Delete a standalone image, its metadata and its thumbnails from every storage tier.

    Copies attached to jobs stay (jobs own their files). Safe to repeat: a second delete is a
    404, and a delete that failed half-way is finished by the next one.
    """
    await assets.delete_character_reference(str(image_id), principal)
    return Response(status_code=204)


async def _express_image(request: Request, image_id: str, redirect: bool) -> Response:
    delivery = await service(request, get_image_delivery)
    principal = await service(request, get_principal)
    return await get_character_reference(
        uuid.UUID(image_id), request, delivery, principal, redirect
    )


async def _express_thumbnail(request: Request, image_id: str, size: str) -> Response:
    delivery = await service(request, get_image_delivery)
    principal = await service(request, get_principal)
    return await get_character_reference_thumbnail(
        uuid.UUID(image_id), ThumbnailSize(int(size)), request, delivery, principal
    )


_SIZES = "|".join(str(size.value) for size in ThumbnailSize)
# The image and thumbnail GETs of the studio and of every <img>: see routers/express.py.
EXPRESS_ROUTES = [
    ExpressRoute(
        "/api/mv/get_character_reference/{image_id}",
        f"/api/mv/get_character_reference/(?P<image_id>{UUID_PATTERN})",
        _express_image,
        flags=["redirect"],
    ),
    ExpressRoute(
        "/api/mv/character_references/{image_id}/thumbnail/{size}",
        f"/api/mv/character_references/(?P<image_id>{UUID_PATTERN})/thumbnail/(?P<size>{_SIZES})",
        _express_thumbnail,
    ),
]


def cloud_location(cloud: CloudImage) -> CloudImageLocation:
    """The JSON reply that points at an image's presigned URL."""
    return CloudImageLocation(
        image_id=cloud.key.rpartition("/")[2].rpartition(".")[0],
        image_url=cloud.url.url,
        expires_in_seconds=cloud.url.expires_in,
        expires_at=cloud.url.expires_at,
        cloud_path=cloud.key,
        content_type=cloud.content_type,
    )


@router.post(
    "/upload_character_reference",
    status_code=201,
    response_model=UploadedCharacterReference,
    openapi_extra=_UPLOAD_BODY,
    responses={
        413: {"description": "the file is larger than 10 MB"},
        415: {"description": "not a PNG, JPEG or WebP image"},
        422: {"description": "no file in the multipart field `file`, or a bad description"},
    },
)
async def upload_character_reference(
    request: Request, service: CharacterReferencesDep, principal: PrincipalDep
) -> UploadedCharacterReference:
    """Store a user's own image (multipart field `file`, at most 10 MB, PNG/JPEG/WebP)."""
    capped = capped_request(request, MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD)
    async with capped.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise FieldError(("body", "file"), "a file is required in the multipart field 'file'")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        description = form.get("character_description")
    if len(data) > MAX_UPLOAD_BYTES:
        raise too_large(MAX_UPLOAD_BYTES)
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
    ):
        raise FieldError(
            ("body", "character_description"), f"at most {MAX_DESCRIPTION_CHARS} characters"
        )
    return await service.upload(data, (description or "").strip() or None, principal.owner)


@router.get(
    "/character_references/{image_id}/metadata",
    response_model=CharacterReferenceRecord,
    responses=_ERRORS,
)
async def get_character_reference_metadata(
    image_id: ImageId, assets: AssetsDep, principal: PrincipalDep
) -> CharacterReferenceRecord:
    """The image's metadata sidecar: how it was made, its size, type and sha256."""
    return await assets.get_character_reference_record(str(image_id), principal)

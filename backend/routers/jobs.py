"""Video jobs: create, read with asset URLs, attach character references, serve assets."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from mv.character_reference import CloudImageLocation
from mv.ids import JOB_ID_PATTERN
from mv.jobs import AttachCharacterReferencesRequest, CreateJobRequest, Job
from mv.lists import JobPage
from mv.principals import Principal
from mv.replies import Reply
from routers.deps import IdempotencyKeyHeader, ImageDeliveryDep, JobsDep, PrincipalDep
from routers.errors import shown
from routers.mv import SERVED_FILE_PARAMETERS, THUMBNAIL_RESPONSES, Size, cloud_location
from routers.openapi.responses import IMAGE_TYPES, LOCATION, Responses, served_file
from routers.paging import PageDep
from routers.serving import REVALIDATE_CACHE, stored_file_response
from services.asset_persistence import CloudImage
from services.jobs import JobService
from services.storage import ObjectNotFoundError

router = APIRouter(prefix="/api/mv/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id")]
ImageId = Annotated[uuid.UUID, Path(description="the image's UUID")]
Redirect = Annotated[bool, Query(description="307 to the presigned URL")]
_NOT_FOUND: Responses = {404: {"description": "no such job or asset"}}


@router.post(
    "",
    status_code=201,
    response_model=Job,
    responses={
        201: {"headers": {"Location": LOCATION}},
        409: {"description": "a job with this id exists, or its Idempotency-Key is in use"},
    },
)
async def create_job(
    body: CreateJobRequest,
    request: Request,
    response: Response,
    jobs: JobsDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Job:
    """Create a video job (`job_id` generated when absent) with optional metadata."""
    job = await jobs.create(body, idempotency_key, principal)
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.job_id).path)
    return job


@router.get("", response_model=JobPage)
async def list_jobs(page: PageDep, jobs: JobsDep) -> JobPage:
    """Your jobs (operators: `owner`'s), newest first, paged."""
    return await jobs.list_jobs(page.owner, page.limit, page.cursor)


@router.get("/{job_id}", response_model=Job, responses=_NOT_FOUND)
async def get_job(job_id: JobId, jobs: JobsDep, principal: PrincipalDep) -> Job:
    """The job and every asset its manifest lists, each with a URL."""
    return await jobs.get(job_id, principal)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses={**_NOT_FOUND, 503: {"description": "storage unreachable; try again"}},
)
async def delete_job(job_id: JobId, jobs: JobsDep, principal: PrincipalDep) -> Response:
    """Delete the job: every file it stored (its character reference copies too), its
    manifest and its record. Safe to repeat: a second delete is a 404."""
    await jobs.delete(job_id, principal)
    return Response(status_code=204)


@router.post("/{job_id}/character_references", response_model=Job, responses=_NOT_FOUND)
async def attach_character_references(
    job_id: JobId, body: AttachCharacterReferencesRequest, jobs: JobsDep, principal: PrincipalDep
) -> Job:
    """Attach stored character references to the job (idempotent); the job afterwards."""
    return await jobs.attach(job_id, body.image_ids, principal)


async def _job_reference(
    jobs: JobService, job_id: str, image_id: uuid.UUID, viewer: Principal
) -> tuple[str, str | None, ObjectNotFoundError]:
    """Key and sha256 of a job's character reference, and the error to raise if it is gone."""
    key, sha256 = await jobs.character_reference_key(job_id, str(image_id), viewer)
    missing = ObjectNotFoundError(key, f"character reference {image_id} of job {job_id} not found")
    return key, sha256, missing


@router.get(
    "/{job_id}/character_references/{image_id}",
    response_class=Response,
    responses=served_file(IMAGE_TYPES, cloud_model=CloudImageLocation, what="job image"),
    dependencies=SERVED_FILE_PARAMETERS,
)
@router.head("/{job_id}/character_references/{image_id}", include_in_schema=False)
async def get_job_character_reference(
    job_id: JobId,
    image_id: ImageId,
    request: Request,
    jobs: JobsDep,
    delivery: ImageDeliveryDep,
    principal: PrincipalDep,
    redirect: Redirect = False,
) -> Response:
    """A job's character reference, served like /get_character_reference."""
    key, sha256, missing = await _job_reference(jobs, job_id, image_id, principal)
    located = await delivery.locate_key(key, sha256, missing)
    return await stored_file_response(
        request, located, redirect=redirect, cloud_reply=cloud_location
    )


@router.get(
    "/{job_id}/character_references/{image_id}/thumbnail/{size}",
    responses=THUMBNAIL_RESPONSES,
    response_class=Response,
    dependencies=SERVED_FILE_PARAMETERS,
)
@router.head("/{job_id}/character_references/{image_id}/thumbnail/{size}", include_in_schema=False)
async def get_job_character_reference_thumbnail(
    job_id: JobId,
    image_id: ImageId,
    size: Size,
    request: Request,
    jobs: JobsDep,
    delivery: ImageDeliveryDep,
    principal: PrincipalDep,
) -> Response:
    """A job's character reference as a WebP thumbnail, served like the standalone one."""
    key, sha256, missing = await _job_reference(jobs, job_id, image_id, principal)
    located = await delivery.locate_thumbnail(key, sha256, size, missing)
    return await stored_file_response(request, located, redirect=True, cloud_reply=cloud_location)


class CloudAssetLocation(Reply):
    """Reply of GET /jobs/{job_id}/assets/{path} when serving from S3."""

    path: str
    asset_url: str
    storage_backend: Literal["s3"] = "s3"
    expires_in_seconds: int
    expires_at: datetime
    cloud_path: str
    content_type: str


@router.get(
    "/{job_id}/assets/{path:path}",
    response_class=Response,
    responses=served_file(
        ("application/octet-stream", "*/*"), cloud_model=CloudAssetLocation, what="job asset"
    ),
    dependencies=SERVED_FILE_PARAMETERS,
)
@router.head("/{job_id}/assets/{path:path}", include_in_schema=False)
async def get_job_asset(
    job_id: JobId,
    path: str,
    request: Request,
    jobs: JobsDep,
    delivery: ImageDeliveryDep,
    principal: PrincipalDep,
    redirect: Redirect = False,
) -> Response:
    """Any file of a job: its bytes, or its presigned URL (JSON or 307) in cloud mode.

    In local serving a JSON file of the job's own is its bytes, as `application/json`."""
    key, sha256 = await jobs.asset_key(job_id, path, principal)
    missing = ObjectNotFoundError(key, f"job {job_id} has no asset {shown(path)}")
    located = await delivery.locate_key(key, sha256, missing)
    return await stored_file_response(
        request,
        located,
        redirect=redirect,
        cloud_reply=_asset_location,
        cache_control=REVALIDATE_CACHE,
    )


def _asset_location(cloud: CloudImage) -> CloudAssetLocation:
    return CloudAssetLocation(
        path=cloud.key.split("/", 2)[2],
        asset_url=cloud.url.url,
        expires_in_seconds=cloud.url.expires_in,
        expires_at=cloud.url.expires_at,
        cloud_path=cloud.key,
        content_type=cloud.content_type,
    )

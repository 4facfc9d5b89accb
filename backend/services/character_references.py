"""Generating and uploading character references: prompt, generation, encoding, storage."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any

from PIL import Image

from mv.character_reference import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_SEED,
    CharacterReferenceImage,
    GenerateCharacterReferenceRequest,
    GenerateCharacterReferenceResponse,
    GenerationMetadata,
    OutputFormat,
    UploadedCharacterReference,
    View,
    build_prompt,
)
from services.asset_persistence import (
    AssetPersistenceService,
    GenerationDetails,
    ManifestEntry,
    StoredCharacterReference,
    UnsupportedImageError,
    encode_image,
    fit_to_area,
    identify_image,
    utc_now,
    verify_image,
)
from services.generation.base import (
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    ProviderError,
    ReferenceImage,
)
from services.generation.diffusion import MAX_REFERENCE_PIXELS
from services.generation.policy import GenerationPolicy

_PILLOW_NAMES = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def encoded_bytes(image: GeneratedImage, output_format: OutputFormat) -> bytes:
    """The image in `output_format`: provider bytes kept when already in it, else (re)encoded."""
    if image.pixels is not None:
        return encode_image(image.pixels, output_format)
    assert image.encoded is not None
    if identify_image(image.encoded).extension == _PILLOW_NAMES[output_format]:
        return image.encoded
    with Image.open(io.BytesIO(image.encoded)) as pixels:
        return encode_image(pixels, output_format)


class CharacterReferenceService:
    """Turns API requests into stored character references."""

    def __init__(self, assets: AssetPersistenceService, policy: GenerationPolicy) -> None:
        self.assets = assets
        self.policy = policy

    async def generate(
        self,
        body: GenerateCharacterReferenceRequest,
        progress: GenerationProgress | None = None,
        owner: str | None = None,
    ) -> GenerateCharacterReferenceResponse:
        """Generate, encode and store every image of the request as `owner`'s, or raise a
        GenerationError.

        Reference images are read when the generation starts (from either storage tier), so
        one deleted since the request was queued fails it with CharacterReferenceNotFoundError.
        Whether the owner may use them was checked when the request was submitted.
        """
        started = time.perf_counter()
        references = await self.load_references(body.reference_image_ids or ())
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        negative_prompt = body.negative_prompt or DEFAULT_NEGATIVE_PROMPT
        views = body.image_views
        description = body.character_description
        request = GenerationRequest(
            prompts=tuple(build_prompt(description, view, len(references)) for view in views),
            seeds=tuple(first_seed + i for i in range(len(views))),
            aspect_ratio=body.aspect_ratio,
            negative_prompt=negative_prompt,
            output_format=body.output_format,
            references=references,
        )
        outcome = await self.policy.generate(request, backend=body.backend, progress=progress)
        result = outcome.result
        if len(result.images) != len(views):
            raise ProviderError(
                f"the {result.backend} generator returned {len(result.images)} of "
                f"{len(views)} images"
            )
        details = GenerationDetails(
            description=description,
            negative_prompt=negative_prompt,
            model=result.model,
            backend=result.backend,
            fallback_reason=outcome.fallback_reason,
            reference_image_ids=list(request.reference_ids) or None,
            owner=owner,
        )
        stored = await asyncio.gather(
            *(
                self._store(image, body, details, prompt, view)
                for image, prompt, view in zip(result.images, request.prompts, views, strict=True)
            )
        )
        if body.job_id is not None:  # listed in the job's manifest, as the attach route does
            entries = [entry for _, entry in stored if entry is not None]
            await self.assets.add_to_job_manifest(body.job_id, entries)
        images = [image for image, _ in stored]
        return GenerateCharacterReferenceResponse(
            images=list(images),
            metadata=GenerationMetadata(
                character_description=description,
                num_images_requested=len(views),
                num_images_generated=len(images),
                model_used=result.model,
                backend=result.backend,
                fallback_reason=outcome.fallback_reason,
                aspect_ratio=body.aspect_ratio,
                reference_image_ids=details.reference_image_ids,
                parameters_used={
                    **_prompt_parameters(request.prompts, body.views),
                    "negative_prompt": negative_prompt,
                    "seeds": list(request.seeds),
                    "output_format": body.output_format,
                    **result.parameters,
                },
                generation_time_ms=round((time.perf_counter() - started) * 1000),
                generation_timestamp=utc_now(),
            ),
        )

    async def load_references(self, image_ids: Sequence[str]) -> tuple[ReferenceImage, ...]:
        """The stored images `image_ids` name, checked as uploads are and scaled down to the
        area the models condition on; CharacterReferenceNotFoundError names a missing one."""

        urls = self.assets.urls

        def prepare(key: str, data: bytes) -> tuple[bytes, str | None]:
            # A provider fetches a presigned URL itself; without one it gets the bytes.
            url = urls.for_key(key) if urls.is_presigned(key) else None
            return fit_to_area(data, MAX_REFERENCE_PIXELS), url

        async def load(image_id: str) -> ReferenceImage:
            key, data = await self.assets.read_character_reference(image_id)
            fitted, url = await asyncio.to_thread(prepare, key, data)
            return ReferenceImage(image_id, fitted, url)

        return tuple(await asyncio.gather(*(load(image_id) for image_id in image_ids)))

    async def _store(
        self,
        image: GeneratedImage,
        body: GenerateCharacterReferenceRequest,
        details: GenerationDetails,
        prompt: str,
        view: View | None,
    ) -> tuple[CharacterReferenceImage, ManifestEntry | None]:
        data = await asyncio.to_thread(encoded_bytes, image, body.output_format)
        stored = await self.assets.store_character_reference(
            str(uuid.uuid4()),
            data,
            job_id=body.job_id,
            details=details.model_copy(update={"seed": image.seed, "prompt": prompt, "view": view}),
        )
        encoded = await asyncio.to_thread(base64.b64encode, data) if body.include_base64 else None
        reply = _image_reply(stored, seed=image.seed, base64_data=encoded, view=view)
        return reply, stored.job_entry

    async def upload(
        self, data: bytes, description: str | None = None, owner: str | None = None
    ) -> UploadedCharacterReference:
        """Verify a user's image (a real PNG, JPEG or WebP) and store it like a generated one,
        as `owner`'s."""
        await asyncio.to_thread(verify_image, data)
        stored = await self.assets.store_character_reference(
            str(uuid.uuid4()),
            data,
            details=GenerationDetails(description=description, backend="upload", owner=owner),
        )
        return UploadedCharacterReference(
            id=stored.id,
            path=stored.key,
            url=stored.url,
            cloud_url=stored.cloud_url,
            thumbnail_url=stored.thumbnail_url,
            width=stored.kind.width,
            height=stored.kind.height,
            content_type=stored.kind.content_type,
            size=stored.size,
            sha256=stored.sha256,
        )


def _prompt_parameters(prompts: Sequence[str], views: Sequence[str] | None) -> dict[str, Any]:
    """The prompt of a request, or each image's prompt and view when it asked for views."""
    if views is None:
        return {"prompt": prompts[0]}
    return {"views": list(views), "prompts": list(prompts)}


def _image_reply(
    stored: StoredCharacterReference,
    *,
    seed: int,
    base64_data: bytes | None,
    view: View | None = None,
) -> CharacterReferenceImage:
    return CharacterReferenceImage(
        id=stored.id,
        path=stored.key,
        url=stored.url,
        cloud_url=stored.cloud_url,
        thumbnail_url=stored.thumbnail_url,
        base64=base64_data.decode("ascii") if base64_data is not None else None,
        seed=seed,
        view=view,
        width=stored.kind.width,
        height=stored.kind.height,
        content_type=stored.kind.content_type,
    )


__all__ = ["CharacterReferenceService", "UnsupportedImageError", "encoded_bytes"]

"""Generating and uploading character references: prompt, generation, encoding, storage."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
import uuid

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
    build_prompt,
)
from services.asset_persistence import (
    AssetPersistenceService,
    GenerationDetails,
    ManifestEntry,
    StoredCharacterReference,
    UnsupportedImageError,
    encode_image,
    identify_image,
    utc_now,
    verify_image,
)
from services.generation.base import (
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    ProviderError,
)
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
    ) -> GenerateCharacterReferenceResponse:
        """Generate, encode and store every image of the request, or raise a GenerationError."""
        started = time.perf_counter()
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        negative_prompt = body.negative_prompt or DEFAULT_NEGATIVE_PROMPT
        request = GenerationRequest(
            prompt=build_prompt(body.character_description),
            seeds=tuple(first_seed + i for i in range(body.num_images)),
            aspect_ratio=body.aspect_ratio,
            negative_prompt=negative_prompt,
            output_format=body.output_format,
        )
        outcome = await self.policy.generate(request, backend=body.backend, progress=progress)
        result = outcome.result
        if len(result.images) != body.num_images:
            raise ProviderError(
                f"the {result.backend} generator returned {len(result.images)} of "
                f"{body.num_images} images"
            )
        details = GenerationDetails(
            description=body.character_description,
            prompt=request.prompt,
            negative_prompt=negative_prompt,
            model=result.model,
            backend=result.backend,
            fallback_reason=outcome.fallback_reason,
        )
        stored = await asyncio.gather(
            *(self._store(image, body, details) for image in result.images)
        )
        if body.job_id is not None:  # listed in the job's manifest, as the attach route does
            entries = [entry for _, entry in stored if entry is not None]
            await self.assets.add_to_job_manifest(body.job_id, entries)
        images = [image for image, _ in stored]
        return GenerateCharacterReferenceResponse(
            images=list(images),
            metadata=GenerationMetadata(
                character_description=body.character_description,
                num_images_requested=body.num_images,
                num_images_generated=len(images),
                model_used=result.model,
                backend=result.backend,
                fallback_reason=outcome.fallback_reason,
                aspect_ratio=body.aspect_ratio,
                parameters_used={
                    "prompt": request.prompt,
                    "negative_prompt": negative_prompt,
                    "seeds": list(request.seeds),
                    "output_format": body.output_format,
                    **result.parameters,
                },
                generation_time_ms=round((time.perf_counter() - started) * 1000),
                generation_timestamp=utc_now(),
            ),
        )

    async def _store(
        self,
        image: GeneratedImage,
        body: GenerateCharacterReferenceRequest,
        details: GenerationDetails,
    ) -> tuple[CharacterReferenceImage, ManifestEntry | None]:
        data = await asyncio.to_thread(encoded_bytes, image, body.output_format)
        stored = await self.assets.store_character_reference(
            str(uuid.uuid4()),
            data,
            job_id=body.job_id,
            details=details.model_copy(update={"seed": image.seed}),
        )
        encoded = await asyncio.to_thread(base64.b64encode, data) if body.include_base64 else None
        return _image_reply(stored, seed=image.seed, base64_data=encoded), stored.job_entry

    async def upload(
        self, data: bytes, description: str | None = None
    ) -> UploadedCharacterReference:
        """Verify a user's image (a real PNG, JPEG or WebP) and store it like a generated one."""
        await asyncio.to_thread(verify_image, data)
        stored = await self.assets.store_character_reference(
            str(uuid.uuid4()),
            data,
            details=GenerationDetails(description=description, backend="upload"),
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


def _image_reply(
    stored: StoredCharacterReference, *, seed: int, base64_data: bytes | None
) -> CharacterReferenceImage:
    return CharacterReferenceImage(
        id=stored.id,
        path=stored.key,
        url=stored.url,
        cloud_url=stored.cloud_url,
        thumbnail_url=stored.thumbnail_url,
        base64=base64_data.decode("ascii") if base64_data is not None else None,
        seed=seed,
        width=stored.kind.width,
        height=stored.kind.height,
        content_type=stored.kind.content_type,
    )


__all__ = ["CharacterReferenceService", "UnsupportedImageError", "encoded_bytes"]

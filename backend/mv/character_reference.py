"""Character references: the prompt template, the aspect-ratio table and the API's models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from mv.ids import parse_job_id

MAX_DESCRIPTION_CHARS = 2000
MAX_IMAGES = 4
# Image i gets seed + i, and seeds are 32-bit everywhere (torch, Replicate): keep the last one so.
MAX_SEED = 2**32 - MAX_IMAGES

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21"]
OutputFormat = Literal["png", "webp", "jpeg"]
GeneratorName = Literal["worker", "local", "replicate"]

# Width x height per aspect ratio at about one megapixel, the native budget of FLUX-class and
# SDXL-class models. Every side is a multiple of 64, so the table also holds at half scale
# (SDXL-Turbo's 512-class images) for any model that needs multiples of 16 (latent scale 8
# times FLUX's 2x2 patches). Ratios that do not fall on that grid take the nearest bucket.
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "4:3": (1152, 896),
    "3:4": (896, 1152),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
}

PROMPT_TEMPLATE = (
    "Character reference sheet, full body, of {description}. Standing in a neutral pose, "
    "facing the viewer, arms relaxed, the whole figure in frame from head to feet, centred, "
    "on a plain light-grey studio background, even soft lighting, sharp focus, clean detailed "
    "rendering, no text."
)
DEFAULT_NEGATIVE_PROMPT = (
    "cropped, out of frame, partial body, close-up, multiple characters, busy background, "
    "scenery, text, watermark, logo, signature, blurry, low quality, deformed, extra limbs, "
    "extra fingers, bad anatomy"
)


def image_size(aspect_ratio: str, scale: float = 1.0) -> tuple[int, int]:
    """Width and height for `aspect_ratio`, at `scale` times the one-megapixel table's sides."""
    width, height = ASPECT_RATIO_SIZES[aspect_ratio]
    return round(width * scale), round(height * scale)


def build_prompt(description: str) -> str:
    """The full prompt for a clean, full-body character reference of `description`."""
    return PROMPT_TEMPLATE.format(description=description.strip().rstrip("."))


Description = Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)]


class GenerateCharacterReferenceRequest(BaseModel):
    """Body of POST /api/mv/generate_character_reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    character_description: Description
    num_images: StrictInt = Field(default=MAX_IMAGES, ge=1, le=MAX_IMAGES)
    aspect_ratio: AspectRatio = "1:1"
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    output_format: OutputFormat = "png"
    backend: GeneratorName | None = None
    job_id: str | None = None
    include_base64: StrictBool = True

    @field_validator("character_description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must contain more than whitespace")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("job_id")
    @classmethod
    def _valid_job_id(cls, value: str | None) -> str | None:
        return None if value is None else parse_job_id(value)


THUMBNAIL_URL_DESCRIPTION = "a WebP of at most 256 px on its long side, made on first request"


class CharacterReferenceImage(BaseModel):
    """One stored candidate image."""

    id: str
    path: str = Field(description="storage key, the same in every storage mode")
    url: str = Field(description="where to fetch the bytes: presigned in S3 mode, else the API")
    cloud_url: str | None = Field(description="presigned S3 URL; null in local mode or pending")
    thumbnail_url: str = Field(description=THUMBNAIL_URL_DESCRIPTION)
    base64: str | None = Field(description="the encoded image, when include_base64 is true")
    seed: int
    width: int
    height: int
    content_type: str


class GenerationMetadata(BaseModel):
    """How a set of candidates was made."""

    character_description: str
    num_images_requested: int
    num_images_generated: int
    model_used: str
    backend: GeneratorName
    fallback_reason: str | None
    aspect_ratio: str
    parameters_used: dict[str, Any]
    generation_time_ms: int
    generation_timestamp: datetime


class GenerateCharacterReferenceResponse(BaseModel):
    """Reply of POST /api/mv/generate_character_reference."""

    images: list[CharacterReferenceImage]
    metadata: GenerationMetadata


class UploadedCharacterReference(BaseModel):
    """Reply of POST /api/mv/upload_character_reference."""

    id: str
    path: str
    url: str
    cloud_url: str | None
    thumbnail_url: str = Field(description=THUMBNAIL_URL_DESCRIPTION)
    width: int
    height: int
    content_type: str
    size: int
    sha256: str


class CloudImageLocation(BaseModel):
    """Reply of GET /api/mv/get_character_reference/{image_id} when serving from S3."""

    image_id: str
    image_url: str
    storage_backend: Literal["s3"] = "s3"
    expires_in_seconds: int
    expires_at: datetime
    cloud_path: str
    content_type: str

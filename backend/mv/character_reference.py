"""Character references: prompt templates, views, the aspect-ratio table and the API models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mv.ids import JobIdText, UuidText, parse_image_id, parse_job_id
from mv.replies import Reply

MAX_DESCRIPTION_CHARS = 2000
MAX_IMAGES = 4
MAX_REFERENCE_IMAGES = 4
MAX_VIEWS = 8
# Every image of one request, whether asked for by num_images or by views.
MAX_IMAGES_PER_REQUEST = max(MAX_IMAGES, MAX_VIEWS)
# Image i gets seed + i, and seeds are 32-bit everywhere (torch, Replicate): keep the last one so.
MAX_SEED = 2**32 - MAX_IMAGES_PER_REQUEST

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


# What each named view asks of the picture. Views frame the same character the way a
# turnaround sheet and an expression sheet do, so an animator (or a video model) sees it from
# every side it will be shown from.
VIEW_PROMPTS: dict[str, str] = {
    "front": "front view, facing the viewer, full body from head to feet, standing straight",
    "three_quarter": "three-quarter view, turned 45 degrees to its right, full body from head "
    "to feet, standing straight",
    "side": "side view in profile, facing left, full body from head to feet, standing straight",
    "back": "back view, facing away from the viewer, full body from head to feet, standing "
    "straight",
    "close_up": "close-up portrait of the head and shoulders, facing the viewer",
    "full_body": "full body from head to feet in a natural, relaxed pose",
    "smiling": "head and shoulders, facing the viewer, smiling warmly",
    "angry": "head and shoulders, facing the viewer, with an angry frown",
    "sad": "head and shoulders, facing the viewer, with a sad expression",
    "surprised": "head and shoulders, facing the viewer, with a surprised expression",
}
View = Literal[
    "front",
    "three_quarter",
    "side",
    "back",
    "close_up",
    "full_body",
    "smiling",
    "angry",
    "sad",
    "surprised",
]
TURNAROUND: tuple[View, ...] = ("front", "three_quarter", "side", "back")

VIEW_TEMPLATE = (
    "Character reference sheet of {description}: {view}, on a plain light-grey studio "
    "background, even soft lighting, sharp focus, clean detailed rendering, no text."
)
# With references, the description says what to make of the character ("the same character
# playing bass on a rooftop at night"), and it comes first: it is what changes between
# requests, and a text encoder that truncates long prompts keeps it. What follows asks the
# model to keep what makes the character recognisable from shot to shot (face, hair, build,
# outfit, colours, style), which is what users of reference features ask for most; the first
# reference is the identity, the others show more of the same character.
REFERENCE_TEMPLATE = (
    "{description}. {view}Keep the character exactly as in {references}: the same face, "
    "hairstyle, body proportions, outfit, colours and art style."
)
REFERENCE_VIEW = "Show the character {view}, on a plain light-grey studio background. "


def image_size(aspect_ratio: str, scale: float = 1.0) -> tuple[int, int]:
    """Width and height for `aspect_ratio`, at `scale` times the one-megapixel table's sides."""
    width, height = ASPECT_RATIO_SIZES[aspect_ratio]
    return round(width * scale), round(height * scale)


def build_prompt(description: str, view: str | None = None, references: int = 0) -> str:
    """The full prompt for one image: a clean, full-body character reference of
    `description` (or its `view`), or, with `references`, the referenced character as the
    description says, keeping its identity."""
    description = description.strip().rstrip(".")
    if references:
        reference_view = REFERENCE_VIEW.format(view=VIEW_PROMPTS[view]) if view else ""
        images = (
            "the reference image"
            if references == 1
            else (f"the {references} reference images (the first shows its identity)")
        )
        return REFERENCE_TEMPLATE.format(
            description=description, view=reference_view, references=images
        )
    if view is not None:
        return VIEW_TEMPLATE.format(description=description, view=VIEW_PROMPTS[view])
    return PROMPT_TEMPLATE.format(description=description)


Description = Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)]


ReferenceImageIds = Annotated[
    list[UuidText],
    Field(
        min_length=1,
        max_length=MAX_REFERENCE_IMAGES,
        description="stored image ids to make the character from; the first is its identity",
    ),
]
Views = Annotated[
    list[View] | Literal["turnaround"],
    Field(
        description=f"instead of num_images: up to {MAX_VIEWS} views, one image each; "
        '"turnaround" is front, three_quarter, side, back'
    ),
]


class GenerateCharacterReferenceRequest(BaseModel):
    """Body of POST /api/mv/generate_character_reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    character_description: Description
    reference_image_ids: ReferenceImageIds | None = None
    views: Views | None = None
    # Declared after `views` so its check sees them. With views, it is their number.
    num_images: StrictInt = Field(
        default=MAX_IMAGES,
        ge=1,
        le=MAX_VIEWS,
        description=f"1-{MAX_IMAGES}; with views, their number (leave it out)",
    )
    aspect_ratio: AspectRatio = "1:1"
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    output_format: OutputFormat = "png"
    backend: GeneratorName | None = None
    job_id: JobIdText | None = None
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

    @field_validator("reference_image_ids")
    @classmethod
    def _valid_reference_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        ids = [parse_image_id(image_id) for image_id in value]
        if len(set(ids)) != len(ids):
            raise ValueError("must not name the same image twice")
        return ids

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: list[str] | str | None) -> list[str] | None:
        if value == "turnaround":
            return list(TURNAROUND)
        if value is not None and not 1 <= len(value) <= MAX_VIEWS:
            raise ValueError(f"must name 1 to {MAX_VIEWS} views")
        return value  # type: ignore[return-value]

    @model_validator(mode="before")
    @classmethod
    def _one_image_per_view(cls, data: Any) -> Any:
        # With views, num_images is their number (so a stored request reads back the same).
        if isinstance(data, dict) and "num_images" not in data:
            views = data.get("views")
            if views == "turnaround":
                return {**data, "num_images": len(TURNAROUND)}
            if isinstance(views, list) and 1 <= len(views) <= MAX_VIEWS:
                return {**data, "num_images": len(views)}
        return data

    @field_validator("num_images")
    @classmethod
    def _fits_the_views(cls, value: int, info: ValidationInfo) -> int:
        views = info.data.get("views")
        if views is None and value > MAX_IMAGES:
            raise ValueError(f"must be at most {MAX_IMAGES} (views may ask for up to {MAX_VIEWS})")
        if views is not None and value != len(views):
            raise ValueError(f"must be left out, or be {len(views)} (one image per view)")
        return value

    @property
    def image_views(self) -> tuple[View | None, ...]:
        """One entry per image to make: its view, or None for the plain template."""
        if self.views is not None:
            return tuple(self.views)  # type: ignore[arg-type]
        return (None,) * self.num_images


THUMBNAIL_URL_DESCRIPTION = "a WebP of at most 256 px on its long side, made on first request"


class CharacterReferenceImage(Reply):
    """One stored candidate image."""

    id: UuidText
    path: str = Field(description="storage key, the same in every storage mode")
    url: str = Field(description="where to fetch the bytes: presigned in S3 mode, else the API")
    cloud_url: str | None = Field(description="presigned S3 URL; null in local mode or pending")
    thumbnail_url: str = Field(description=THUMBNAIL_URL_DESCRIPTION)
    base64: str | None = Field(description="the encoded image, when include_base64 is true")
    seed: int
    view: View | None = Field(default=None, description="the view it shows, when views were asked")
    width: int
    height: int
    content_type: str


class GenerationMetadata(Reply):
    """How a set of candidates was made."""

    character_description: str
    num_images_requested: int
    num_images_generated: int
    model_used: str
    backend: GeneratorName
    fallback_reason: str | None
    aspect_ratio: str
    reference_image_ids: list[UuidText] | None = Field(
        default=None, description="the stored images the character was made from"
    )
    parameters_used: dict[str, Any]
    generation_time_ms: int
    generation_timestamp: datetime


class GenerateCharacterReferenceResponse(Reply):
    """Reply of POST /api/mv/generate_character_reference."""

    images: list[CharacterReferenceImage]
    metadata: GenerationMetadata


class UploadedCharacterReference(Reply):
    """Reply of POST /api/mv/upload_character_reference."""

    id: UuidText
    path: str
    url: str
    cloud_url: str | None
    thumbnail_url: str = Field(description=THUMBNAIL_URL_DESCRIPTION)
    width: int
    height: int
    content_type: str
    size: int
    sha256: str


class CloudImageLocation(Reply):
    """Reply of GET /api/mv/get_character_reference/{image_id} when serving from S3."""

    image_id: UuidText
    image_url: str
    storage_backend: Literal["s3"] = "s3"
    expires_in_seconds: int
    expires_at: datetime
    cloud_path: str
    content_type: str

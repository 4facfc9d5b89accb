"""The GPU worker tier's internal HTTP API, shared by the API (client) and the worker app.

POST {WORKER_URL}/generate with a WorkerGenerateRequest answers 200 with newline-delimited
JSON events, in order: `accepted` (a worker replica took the request), `progress` (after each
denoising step), one `image` per seed, then `done`; or `error` in place of the images. A
stream that ends without `done` or `error` means the worker failed mid-generation. Closing
the stream cancels the request. Before the stream starts the worker may answer 401 (token),
422 (body), 429 with Retry-After (Serve's queue is full) or 503 (no replica can serve).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter

from mv.character_reference import MAX_DESCRIPTION_CHARS, MAX_IMAGES, AspectRatio, OutputFormat
from services.generation.base import GenerationRequest

TOKEN_HEADER = "X-Worker-Token"
NDJSON = "application/x-ndjson"
MAX_SEED_VALUE = 2**32 - 1
# The prompt template adds a few hundred characters to a description.
MAX_PROMPT_CHARS = 2 * MAX_DESCRIPTION_CHARS


class WorkerGenerateRequest(BaseModel):
    """What the worker generates: one image per seed, of one prompt, size and format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED_VALUE)]] = Field(
        min_length=1, max_length=MAX_IMAGES
    )
    aspect_ratio: AspectRatio = "1:1"
    negative_prompt: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    output_format: OutputFormat = "png"

    @classmethod
    def of(cls, request: GenerationRequest) -> WorkerGenerateRequest:
        """The wire form of a GenerationRequest."""
        return cls(
            prompt=request.prompt,
            seeds=list(request.seeds),
            aspect_ratio=request.aspect_ratio,  # type: ignore[arg-type]
            negative_prompt=request.negative_prompt,
            output_format=request.output_format,
        )

    def generation_request(self) -> GenerationRequest:
        """The GenerationRequest this asks for."""
        return GenerationRequest(
            prompt=self.prompt,
            seeds=tuple(self.seeds),
            aspect_ratio=self.aspect_ratio,
            negative_prompt=self.negative_prompt,
            output_format=self.output_format,
        )


class Accepted(BaseModel):
    """A worker replica took the request (it may still wait for a batch)."""

    event: Literal["accepted"] = "accepted"
    replica: str


class Progress(BaseModel):
    """`step` of `total_steps` denoising steps are done."""

    event: Literal["progress"] = "progress"
    step: int
    total_steps: int


class EncodedImage(BaseModel):
    """One finished image, encoded in the requested format (base64 on the wire)."""

    event: Literal["image"] = "image"
    seed: int
    content_type: str
    data: bytes = Field(description="base64 of the encoded image")

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class Done(BaseModel):
    """Every image was sent; how they were made."""

    event: Literal["done"] = "done"
    model: str
    parameters: dict[str, Any]


class Failed(BaseModel):
    """The generation failed; `error` is OutOfMemory, GeneratorFailed or InvalidRequest."""

    event: Literal["error"] = "error"
    error: str
    message: str


WorkerEvent = Annotated[
    Accepted | Progress | EncodedImage | Done | Failed, Field(discriminator="event")
]
WORKER_EVENT = TypeAdapter(WorkerEvent)


def encode_event(event: BaseModel) -> bytes:
    """One NDJSON line."""
    return event.model_dump_json().encode() + b"\n"


def decode_event(line: str | bytes) -> Accepted | Progress | EncodedImage | Done | Failed:
    """Parse one NDJSON line; pydantic.ValidationError when it is not an event."""
    return WORKER_EVENT.validate_json(line)

"""The GPU worker tier's internal HTTP API, shared by the API (client) and the worker app.

POST {WORKER_URL}/generate with a WorkerGenerateRequest (reference images, when it has any,
travel base64-encoded in that JSON body) answers 200 with a stream of events,
in order: `accepted` (a worker replica took the request), `progress` (after each denoising
step), one `image` per seed, then `done`; or `error` in place of the images. Each event is a
line of JSON; an `image` line carries the image's `size`, and exactly that many bytes of the
encoded image follow it (raw: no base64 on either side). A stream that ends without `done`
or `error` means the worker failed mid-generation. Closing the stream cancels the request.
Before the stream starts the worker may answer 401 (token), 422 (body), 429 with Retry-After
(Serve's queue is full) or 503 (no replica can serve).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    Base64Bytes,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    model_validator,
)

from mv.character_reference import (
    MAX_DESCRIPTION_CHARS,
    MAX_IMAGES_PER_REQUEST,
    MAX_REFERENCE_IMAGES,
    AspectRatio,
    OutputFormat,
)
from services.generation.base import GenerationRequest, ReferenceImage

TOKEN_HEADER = "X-Worker-Token"
STREAM_MEDIA_TYPE = "application/x-mv-worker-events"
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024
MAX_SEED_VALUE = 2**32 - 1
# The prompt template adds a few hundred characters to a description.
MAX_PROMPT_CHARS = 2 * MAX_DESCRIPTION_CHARS
# A reference image is at most a megapixel (scaled down before it is sent); even a noisy PNG
# of that size stays well under this.
MAX_REFERENCE_BYTES = 16 * 1024 * 1024


class WorkerReference(BaseModel):
    """A reference image on the wire: its id and its bytes, base64-encoded in the JSON body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    data: Base64Bytes = Field(max_length=MAX_REFERENCE_BYTES)


class WorkerGenerateRequest(BaseModel):
    """What the worker generates: one image per seed, each with its prompt, of one size and
    format, from the same reference images (none for text-to-image)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=MAX_IMAGES_PER_REQUEST
    )
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED_VALUE)]] = Field(
        min_length=1, max_length=MAX_IMAGES_PER_REQUEST
    )
    aspect_ratio: AspectRatio = "1:1"
    negative_prompt: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    output_format: OutputFormat = "png"
    references: list[WorkerReference] = Field(default=[], max_length=MAX_REFERENCE_IMAGES)

    @model_validator(mode="after")
    def _one_prompt_per_seed(self) -> WorkerGenerateRequest:
        if len(self.prompts) != len(self.seeds):
            raise ValueError("prompts and seeds must have the same length")
        return self

    @classmethod
    def of(cls, request: GenerationRequest) -> WorkerGenerateRequest:
        """The wire form of a GenerationRequest."""
        return cls(
            prompts=list(request.prompts),
            seeds=list(request.seeds),
            aspect_ratio=request.aspect_ratio,  # type: ignore[arg-type]
            negative_prompt=request.negative_prompt,
            output_format=request.output_format,
            references=[
                WorkerReference(id=r.id, data=base64.b64encode(r.data)) for r in request.references
            ],
        )

    def generation_request(self) -> GenerationRequest:
        """The GenerationRequest this asks for."""
        return GenerationRequest(
            prompts=tuple(self.prompts),
            seeds=tuple(self.seeds),
            aspect_ratio=self.aspect_ratio,
            negative_prompt=self.negative_prompt,
            output_format=self.output_format,
            references=tuple(ReferenceImage(r.id, r.data) for r in self.references),
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


class ImageHeader(BaseModel):
    """The line before an image's bytes: which seed, what format, how many bytes follow."""

    event: Literal["image"] = "image"
    seed: int
    content_type: str
    size: int = Field(ge=1, le=MAX_IMAGE_BYTES)


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One finished image, encoded in the requested format."""

    seed: int
    content_type: str
    data: bytes
    event: Literal["image"] = "image"


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


WorkerEvent = Accepted | Progress | EncodedImage | Done | Failed
_HEADER = TypeAdapter(
    Annotated[Accepted | Progress | ImageHeader | Done | Failed, Field(discriminator="event")]
)


def encode_event(event: WorkerEvent) -> bytes:
    """An event as the stream carries it: a JSON line, and an image's bytes after its line."""
    if isinstance(event, EncodedImage):
        header = ImageHeader(seed=event.seed, content_type=event.content_type, size=len(event.data))
        return header.model_dump_json().encode() + b"\n" + event.data
    return event.model_dump_json().encode() + b"\n"


class EventReader:
    """Splits a worker stream into events, however its bytes are cut into chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._image: ImageHeader | None = None  # read; its bytes are still arriving

    def feed(self, chunk: bytes) -> list[WorkerEvent]:
        """The events `chunk` completes; ValueError (or pydantic's) on an unreadable line."""
        self._buffer += chunk
        events: list[WorkerEvent] = []
        while True:
            if self._image is not None:
                size = self._image.size
                if len(self._buffer) < size:
                    return events
                data = bytes(self._buffer[:size])
                del self._buffer[:size]
                events.append(EncodedImage(self._image.seed, self._image.content_type, data))
                self._image = None
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > MAX_LINE_BYTES:
                    raise ValueError("an event line is longer than any event")
                return events
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.strip():
                event = _HEADER.validate_json(line)
                if isinstance(event, ImageHeader):
                    self._image = event
                else:
                    events.append(event)

    @property
    def complete(self) -> bool:
        """Whether the stream so far ends on an event boundary."""
        return self._image is None and not self._buffer.strip()

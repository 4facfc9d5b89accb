"""ReplicateGenerator: the official replicate client, with retries and checked downloads."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import replicate
from replicate.exceptions import ModelError, ReplicateError

from mv.character_reference import MAX_REFERENCE_IMAGES, image_size
from services.asset_persistence import UnsupportedImageError, identify_image, verify_image
from services.backoff import backoff_delay, parse_retry_after
from services.generation.base import (
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    ProviderError,
    ReferenceImage,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Replicate serves prediction outputs from its delivery CDN only.
DELIVERY_HOSTS = ("replicate.delivery",)
MAX_OUTPUT_BYTES = 25 * 1024 * 1024
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_FORMAT_NAMES = {"png": "png", "webp": "webp", "jpeg": "jpg"}


class RetryableHTTPError(Exception):
    """A 429 / 5xx reply, with the delay the provider asked for (seconds), if any."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


async def _raise_retryable(response: httpx.Response) -> None:
    """httpx response hook: turn 429 / 5xx into RetryableHTTPError, keeping Retry-After."""
    if response.status_code in RETRYABLE_STATUS:
        await response.aread()
        raise RetryableHTTPError(
            response.status_code, parse_retry_after(response.headers.get("Retry-After"))
        )


def max_references_of(model: str) -> int:
    """Reference images a Replicate model's inputs take (0: text-to-image only)."""
    name = model.split(":")[0].lower()
    if "kontext" in name:
        return 1  # input_image
    if "flux-2" in name:
        return MAX_REFERENCE_IMAGES  # images (the provider takes up to 5)
    return 0


def replicate_inputs(
    model: str,
    request: GenerationRequest,
    index: int,
    reference_urls: Sequence[str] = (),
) -> dict[str, Any]:
    """Inputs for image `index` of `request` (its prompt and seed), in the schema of
    `model`'s family, with the references at `reference_urls`."""
    name = model.split(":")[0].lower()
    prompt, seed = request.prompts[index], request.seeds[index]
    if "kontext" in name:
        inputs: dict[str, Any] = {
            "prompt": prompt,
            "aspect_ratio": request.aspect_ratio,
            "seed": seed,
            "output_format": "png" if request.output_format == "png" else "jpg",
        }
        if reference_urls:
            inputs["input_image"] = reference_urls[0]
        return inputs
    if "flux-2" in name:
        inputs = {
            "prompt": prompt,
            "aspect_ratio": request.aspect_ratio,
            "seed": seed,
            "output_format": _FORMAT_NAMES[request.output_format],
            "output_quality": 95,
        }
        if reference_urls:
            inputs["images"] = list(reference_urls)
        return inputs
    if "flux" in name:
        return {
            "prompt": prompt,
            "num_outputs": 1,
            "aspect_ratio": request.aspect_ratio,
            "seed": seed,
            "output_format": _FORMAT_NAMES[request.output_format],
            "output_quality": 95,
        }
    width, height = image_size(request.aspect_ratio)
    inputs = {"prompt": prompt, "num_outputs": 1, "width": width, "height": height, "seed": seed}
    if request.negative_prompt:
        inputs["negative_prompt"] = request.negative_prompt
    return inputs


def is_delivery_url(url: str, hosts: tuple[str, ...] = DELIVERY_HOSTS) -> bool:
    """True for https URLs on one of `hosts` or their subdomains."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme == "https" and any(host == h or host.endswith("." + h) for h in hosts)


class ReplicateGenerator:
    """Generates through Replicate: one prediction per seed, run concurrently.

    One prediction per image is what makes "image i gets seed + i" true on a provider that
    takes a single seed per prediction. A request with reference images runs on
    `reference_model`; each reference goes as its presigned URL when it has one (S3 mode),
    otherwise it is uploaded once through the client's file API and its URL shared by every
    prediction. Outputs are downloaded at once (the provider deletes them within the hour),
    only from its delivery hosts, size-capped and checked as images.
    """

    name: Literal["replicate"] = "replicate"

    def __init__(
        self,
        api_token: str,
        model: str,
        *,
        reference_model: str | None = None,
        max_attempts: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        delivery_hosts: tuple[str, ...] = DELIVERY_HOSTS,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
        poll_interval: float = 0.5,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> None:
        self.model = model
        self.reference_model = reference_model or model
        self.max_attempts = max_attempts
        self.delivery_hosts = delivery_hosts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_output_bytes = max_output_bytes
        hooks = {"response": [_raise_retryable]}
        self._client = replicate.Client(api_token=api_token, transport=transport, event_hooks=hooks)
        self._client.poll_interval = poll_interval
        self._downloads = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(30.0, connect=10.0),
            follow_redirects=False,
            event_hooks=hooks,
        )

    def start(self) -> None:
        """Nothing to prepare: the client connects on first use."""

    async def unavailable_reason(self) -> str | None:
        """Always available once configured with a token."""
        return None

    def known_unavailable_reason(self) -> str | None:
        """Always available once configured with a token."""
        return None

    def max_references(self) -> int:
        """Reference images the reference model takes."""
        return max_references_of(self.reference_model)

    def describe(self) -> dict[str, Any]:
        """Models and retry policy (never the token)."""
        return {
            "model": self.model,
            "reference_model": self.reference_model,
            "max_references": self.max_references(),
            "state": "ready",
            "max_attempts": self.max_attempts,
        }

    async def generate(
        self, request: GenerationRequest, progress: GenerationProgress | None = None
    ) -> GenerationResult:
        """One prediction per seed, concurrently; progress counts finished images.

        Canceling the awaiting task cancels every prediction's requests with it.
        """
        progress = progress or GenerationProgress()
        progress.advance(0, request.num_images)
        model = self.reference_model if request.references else self.model
        reference_urls = await asyncio.gather(*(self._url_of(r) for r in request.references))
        done = 0

        async def counted(index: int) -> GeneratedImage:
            nonlocal done
            inputs = replicate_inputs(model, request, index, reference_urls)
            image = await self._one_image(model, inputs, request.seeds[index])
            done += 1
            progress.advance(done, request.num_images)
            return image

        # A TaskGroup, not gather: when one image fails for good, its siblings are canceled
        # instead of retrying on in the background after the request has failed.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(counted(i)) for i in range(request.num_images)]
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
        images = [task.result() for task in tasks]
        parameters = {"model_inputs": replicate_inputs(model, request, 0, reference_urls)}
        parameters["model_inputs"].pop("seed")
        for name in ("images", "input_image"):  # presigned URLs expire: not worth keeping
            parameters["model_inputs"].pop(name, None)
        return GenerationResult(tuple(images), model, "replicate", parameters)

    async def _url_of(self, reference: ReferenceImage) -> str:
        """Where the provider fetches a reference: its presigned URL, or an upload's URL."""
        if reference.url is not None:
            return reference.url
        kind = identify_image(reference.data)
        uploaded = await self._with_retries(
            lambda: self._client.files.async_create(
                io.BytesIO(reference.data),
                filename=f"{reference.id}.{kind.extension}",
                content_type=kind.content_type,
            ),
            what="the reference upload",
        )
        return str(uploaded.urls["get"])

    async def _one_image(self, model: str, inputs: dict[str, Any], seed: int) -> GeneratedImage:
        output = await self._with_retries(
            lambda: self._client.async_run(model, input=inputs, use_file_output=False),
            what="the prediction",
        )
        urls = output if isinstance(output, list) else [output]
        if not urls or not isinstance(urls[0], str):
            raise ProviderError("Replicate returned no image for the prediction")
        data = await self._with_retries(lambda: self._download(urls[0]), what="the download")
        return GeneratedImage(seed=seed, encoded=data)

    async def _download(self, url: str) -> bytes:
        if not is_delivery_url(url, self.delivery_hosts):
            raise ProviderError("Replicate returned an output URL outside its delivery hosts")
        chunks: list[bytes] = []
        received = 0
        async with self._downloads.stream("GET", url) as response:
            if response.status_code != 200:
                status = response.status_code
                raise ProviderError(f"downloading the output failed with HTTP {status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_output_bytes:
                raise ProviderError("the output image is larger than the allowed size")
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > self.max_output_bytes:
                    raise ProviderError("the output image is larger than the allowed size")
                chunks.append(chunk)
        data = b"".join(chunks)
        try:
            await asyncio.to_thread(verify_image, data)
        except UnsupportedImageError as error:
            raise ProviderError(f"Replicate returned an unusable image: {error}") from None
        return data

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run `attempt`, retrying 429 / 5xx / network errors with jittered backoff."""
        for number in range(1, self.max_attempts + 1):
            try:
                return await attempt()
            except RetryableHTTPError as error:
                failure, retry_after = f"HTTP {error.status}", error.retry_after
            except httpx.TransportError as error:
                failure, retry_after = type(error).__name__, None
            except ReplicateError as error:
                raise ProviderError(
                    f"Replicate refused {what}: HTTP {error.status} {error.title or ''}".strip()
                ) from None
            except ModelError as error:
                raise ProviderError(f"the Replicate prediction failed: {error}") from None
            if number == self.max_attempts:
                break
            delay = self._backoff(number, retry_after)
            logger.warning("Replicate %s: %s; retrying in %.1f s", what, failure, delay)
            await asyncio.sleep(delay)
        raise ProviderError(
            f"Replicate failed {what} after {self.max_attempts} attempt(s): {failure}"
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff, never sooner than the provider's Retry-After."""
        return backoff_delay(
            attempt, base=self.backoff_base, cap=self.backoff_cap, retry_after=retry_after
        )

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        await self._downloads.aclose()

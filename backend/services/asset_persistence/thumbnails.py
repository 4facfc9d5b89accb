"""Thumbnails: small WebP copies of stored images, made once on first request, kept in storage.

Made on first request rather than at persist time: every image gets one whatever stored it
(the API, a worker's `persist_job_assets`, a version that had no thumbnails), and images no
one looks at cost nothing. Concurrent first requests in a replica share one rendering
(single-flight); replicas racing on one image write the same bytes, since the rendering is
deterministic.
"""

from __future__ import annotations

import asyncio
import io
import warnings

from PIL import Image

from services.asset_persistence.images import identify_image
from services.storage import KnownKeys, StorageBackend, thumbnail_key

WEBP_QUALITY = 80
THUMBNAIL_CONTENT_TYPE = "image/webp"


def render_thumbnail(data: bytes, size: int) -> bytes:
    """A WebP of at most `size` px on its long side; UnsupportedImageError for a non-image or
    a decompression bomb (checked from the header, before any pixel is decoded)."""
    identify_image(data)  # format and pixel count from the header: refuses bombs early
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much cheaper
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
            pixels = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
            buffer = io.BytesIO()
            pixels.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=4)
    return buffer.getvalue()


class ThumbnailStore:
    """Finds or makes the thumbnail of a stored image."""

    def __init__(self, storage: StorageBackend) -> None:
        self.storage = storage
        self._made = KnownKeys()  # thumbnails known to exist: no storage lookup per request
        self._rendering: dict[str, asyncio.Future[str]] = {}

    async def ensure(self, image_key: str, size: int) -> str:
        """The key of the image's `size`-px thumbnail, rendering and storing it if needed."""
        key = thumbnail_key(image_key, size)
        if key in self._made:
            return key
        rendering = self._rendering.get(key)
        if rendering is None:
            rendering = asyncio.ensure_future(self._make(image_key, key, size))
            self._rendering[key] = rendering
            rendering.add_done_callback(lambda _: self._rendering.pop(key, None))
        return await asyncio.shield(rendering)  # one waiter leaving does not cancel the rest

    async def _make(self, image_key: str, key: str, size: int) -> str:
        await asyncio.to_thread(self._make_blocking, image_key, key, size)
        self._made.add(key)
        return key

    def _make_blocking(self, image_key: str, key: str, size: int) -> None:
        if self.storage.exists(key):
            return
        thumbnail = render_thumbnail(self.storage.get_bytes(image_key), size)
        self.storage.put_bytes(key, thumbnail, THUMBNAIL_CONTENT_TYPE)

    def known_under(self, prefix: str) -> list[str]:
        """The thumbnails under `prefix` this store remembers."""
        return self._made.under(prefix)

    def forget(self, keys: list[str]) -> None:
        """Drop deleted thumbnails from what this store remembers."""
        for key in keys:
            self._made.discard(key)

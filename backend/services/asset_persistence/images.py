"""Recognising stored image formats from their bytes, not their names."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Pillow format name -> (stored extension, content type)
_FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}


class UnsupportedImageError(ValueError):
    """The bytes are not a PNG, JPEG or WebP image (or are a decompression bomb)."""


@dataclass(frozen=True, slots=True)
class ImageKind:
    """Format and dimensions read from an image header."""

    extension: str
    content_type: str
    width: int
    height: int


def identify_image(data: bytes, *, decode: bool = False) -> ImageKind:
    """Identify a PNG, JPEG or WebP from its header; raise UnsupportedImageError otherwise.

    With `decode`, the whole image is decoded too, so truncated or corrupt data is refused.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
                if decode and image_format in _FORMATS:
                    image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedImageError("the image has too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError("not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError):
        raise UnsupportedImageError("the image data is corrupt or truncated") from None
    if image_format not in _FORMATS:
        raise UnsupportedImageError(f"image format {image_format} is not PNG, JPEG or WebP")
    extension, content_type = _FORMATS[image_format]
    return ImageKind(extension, content_type, width, height)


def verify_image(data: bytes) -> ImageKind:
    """Identify and fully decode untrusted bytes (uploads, provider outputs)."""
    return identify_image(data, decode=True)


# Encoder options per requested format. PNG uses zlib level 3 rather than Pillow's default 6:
# encoding sits on every generation's critical path, and the higher levels cost far more time
# than they save in bytes on photographic images.
_ENCODERS: dict[str, tuple[str, dict[str, object]]] = {
    "png": ("PNG", {"compress_level": 3}),
    "webp": ("WEBP", {"quality": 90, "method": 4}),
    "jpeg": ("JPEG", {"quality": 92, "optimize": False}),
}


def encode_image(pixels: Image.Image, output_format: str) -> bytes:
    """Encode pixels as png, webp or jpeg (RGB; alpha is dropped for JPEG)."""
    pillow_format, options = _ENCODERS[output_format]
    if pixels.mode not in ("RGB", "RGBA") or (pillow_format == "JPEG" and pixels.mode != "RGB"):
        pixels = pixels.convert("RGB")
    buffer = io.BytesIO()
    pixels.save(buffer, format=pillow_format, **options)
    return buffer.getvalue()


def fit_to_area(data: bytes, max_pixels: int) -> bytes:
    """Untrusted image bytes checked like an upload (fully decoded, no bomb), and scaled down
    to at most `max_pixels` pixels as a PNG; bytes already small enough come back as they are."""
    kind = verify_image(data)
    if kind.width * kind.height <= max_pixels:
        return data
    scale = (max_pixels / (kind.width * kind.height)) ** 0.5
    size = (max(1, int(kind.width * scale)), max(1, int(kind.height * scale)))
    with Image.open(io.BytesIO(data)) as image:
        return encode_image(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), "png")

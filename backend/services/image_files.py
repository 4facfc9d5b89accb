"""Recognising stored image formats from their bytes, not their names."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

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


def identify_image(data: bytes) -> ImageKind:
    """Identify a PNG, JPEG or WebP from its header; raise UnsupportedImageError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise UnsupportedImageError(f"not a readable PNG, JPEG or WebP image: {error}") from None
    if image_format not in _FORMATS:
        raise UnsupportedImageError(f"image format {image_format} is not PNG, JPEG or WebP")
    extension, content_type = _FORMATS[image_format]
    return ImageKind(extension, content_type, width, height)

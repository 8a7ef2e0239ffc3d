"""Image checks with Pillow: the type comes from the bytes, and the whole image must decode."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int
    size: int
    sha256: str


class ImageRejected(Exception):
    """Why an upload is not an acceptable image, with the HTTP status that says so."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def inspect_image(data: bytes, max_side: int) -> ImageInfo:
    """Identify, bound and fully decode `data`. CPU-bound: call it in a thread."""
    try:
        with Image.open(io.BytesIO(data), formats=list(CONTENT_TYPES)) as image:
            fmt = image.format or ""
            width, height = image.size
    except UnidentifiedImageError:
        raise ImageRejected(415, "Unsupported image type", "the image is not a JPEG, PNG, WebP or GIF file") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, "Image too large", str(exc)) from None
    if width > max_side or height > max_side:
        raise ImageRejected(
            413, "Image too large", f"the image is {width}x{height} pixels; at most {max_side} on a side"
        )
    _decode_fully(data)
    return ImageInfo(CONTENT_TYPES[fmt], width, height, len(data), hashlib.sha256(data).hexdigest())


def _decode_fully(data: bytes) -> None:
    # The sides are already bounded, so Pillow's own bomb warning adds nothing here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageRejected(400, "Undecodable image", f"the image cannot be decoded: {exc}") from None

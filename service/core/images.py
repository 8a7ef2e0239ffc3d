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


# Pillow holds a pixel of these modes in one byte and of every other mode in four.
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
# A JPEG decoded at an eighth of its size each way still entropy-decodes every block of the file, so it
# proves as much as a full decode for 1/64 of the pixels.
JPEG_PROOF_SCALE = 8


@dataclass(frozen=True)
class ImageHeader:
    """What the headers say, read before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def scale(self) -> int:
        return JPEG_PROOF_SCALE if self.format == "JPEG" else 1

    @property
    def decode_bytes(self) -> int:
        """The memory decoding takes: Pillow's pixels, and libwebp's own buffer before it copies them."""
        pixels = -(-self.width // self.scale) * -(-self.height // self.scale)
        copies = 2 if self.format == "WEBP" else 1
        return pixels * copies * (1 if self.mode in _ONE_BYTE_MODES else 4)


def read_header(data: bytes, max_side: int) -> ImageHeader:
    """Identify `data` by its bytes and bound its sides. Parses headers only, so it is cheap."""
    try:
        with Image.open(io.BytesIO(data), formats=list(CONTENT_TYPES)) as image:
            header = ImageHeader(image.format or "", image.width, image.height, image.mode)
    except UnidentifiedImageError:
        raise ImageRejected(415, "Unsupported image type", "the image is not a JPEG, PNG, WebP or GIF file") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, "Image too large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a known type whose headers are broken or cut short
        raise _undecodable(exc) from None
    if header.width > max_side or header.height > max_side:
        raise ImageRejected(
            413, "Image too large", f"the image is {header.width}x{header.height} pixels; at most {max_side} on a side"
        )
    return header


def decode(data: bytes, header: ImageHeader) -> ImageInfo:
    """Prove that the whole of `data` decodes. CPU-bound: call it in a thread."""
    # The sides are already bounded, so Pillow's own bomb warning adds nothing here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[header.format]) as image:
                image.draft(None, (-(-header.width // header.scale), -(-header.height // header.scale)))
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _undecodable(exc) from None
    return ImageInfo(
        CONTENT_TYPES[header.format], header.width, header.height, len(data), hashlib.sha256(data).hexdigest()
    )


def _undecodable(exc: Exception) -> ImageRejected:
    return ImageRejected(400, "Undecodable image", f"the image cannot be decoded: {exc}")


def inspect_image(data: bytes, max_side: int) -> ImageInfo:
    """Identify, bound and fully decode `data`, not counting the memory that takes. CPU-bound."""
    return decode(data, read_header(data, max_side))

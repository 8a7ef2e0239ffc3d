"""Image checks with Pillow: the type comes from the bytes, and the whole image must decode."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# MPO is how Pillow names a JPEG with a multi-picture index (what cameras and phones write): a JPEG.
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# The openers to try: Pillow's JPEG opener is the one that returns MPO files.
OPENERS = [fmt for fmt in CONTENT_TYPES if fmt != "MPO"]


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
# Copies of the pixels a decode holds at once: libwebp's two canvases, the bytes handed to Pillow, and
# Pillow's image (measured in review); one for the others.
_PIXEL_COPIES = {"WEBP": 4}
# A JPEG decoded at an eighth of its size each way still entropy-decodes every block of the file, so it
# proves as much as a full decode for 1/64 of the pixels.
JPEG_PROOF_SCALE = 8
# A JPEG of several scans (progressive, or not interleaved) is decoded through a buffer of every DCT
# coefficient of the image, 2 bytes each, whatever the scale; and each scan costs a pass over it.
# libjpeg-turbo advises a cap on scans: legitimate files have about ten.
MAX_JPEG_SCANS = 100
_COEFFICIENT_BYTES = 2
# An image within these bounds is checked on the event loop: its check takes at most about 1.5 ms (each
# format measured at the bounds: benchmarks/README.md), less than the two thread hops it would take
# otherwise, with their GIL hand-overs, on a busy machine. Larger or wider images are checked in a thread.
INLINE_CHECK_BYTES = 64 * 1024
INLINE_CHECK_PIXELS = 1 << 16


@dataclass(frozen=True)
class ImageHeader:
    """What the headers say, read before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str
    # The whole-image coefficient buffer of a JPEG of several scans; 0 otherwise.
    coefficient_bytes: int = 0

    @property
    def scale(self) -> int:
        return JPEG_PROOF_SCALE if self.format in JPEG_FORMATS else 1

    @property
    def decode_bytes(self) -> int:
        """The memory decoding takes: the pixels as Pillow and the codec hold them, and coefficients."""
        pixels = -(-self.width // self.scale) * -(-self.height // self.scale)
        copies = _PIXEL_COPIES.get(self.format, 1)
        return pixels * copies * (1 if self.mode in _ONE_BYTE_MODES else 4) + self.coefficient_bytes

    @property
    def decodes_inline(self) -> bool:
        """Whether proving that it decodes is cheap enough for the event loop (with INLINE_CHECK_BYTES)."""
        return self.width * self.height <= INLINE_CHECK_PIXELS and self.decode_bytes <= 4 * INLINE_CHECK_PIXELS


def _coefficient_bytes(data: bytes, image: Image.Image) -> int:
    """The coefficient buffer a JPEG of several scans needs (0 for one scan), or ImageRejected for
    too many scans. Start-of-scan markers are counted in the bytes: inside entropy-coded data every
    0xFF byte is stuffed with 0x00, so 0xFFDA is always a marker."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageRejected(413, "Image too large", f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS}")
    if scans <= 1:
        return 0
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    most_h, most_v = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    blocks = 0
    for _, h, v, _ in layers:
        blocks += -(-image.width * h // (8 * most_h)) * -(-image.height * v // (8 * most_v))
    return blocks * 64 * _COEFFICIENT_BYTES


def read_header(data: bytes, max_side: int) -> ImageHeader:
    """Identify `data` by its bytes and bound its sides. Parses headers only, so it is cheap."""
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as image:
            fmt = image.format or ""
            coefficients = _coefficient_bytes(data, image) if fmt in JPEG_FORMATS else 0
            header = ImageHeader(fmt, image.width, image.height, image.mode, coefficients)
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
            opener = "JPEG" if header.format in JPEG_FORMATS else header.format
            with Image.open(io.BytesIO(data), formats=[opener]) as image:
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

"""Image variants: their configuration (name, box, format) and the Pillow transform that makes them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image, ImageCms, ImageOps

from service.core.images import CONTENT_TYPES, OPENERS

VARIANT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_VARIANT_BOX = 4096
DEFAULT_VARIANTS = "thumb:64,small:256,medium:512"
# 16-bit and 32-bit greyscale modes: scaled down to 8 bits, not clipped (clipping turns them white).
_WIDE_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SRGB = ImageCms.createProfile("sRGB")


class VariantFormat(StrEnum):
    """What variants are encoded as (PROFILES_VARIANT_FORMAT)."""

    WEBP = "webp"
    JPEG = "jpeg"

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.pillow_format]

    @property
    def pillow_format(self) -> str:
        return self.value.upper()

    @classmethod
    def of_content_type(cls, content_type: str) -> VariantFormat:
        return next(fmt for fmt in cls if fmt.content_type == content_type)


@dataclass(frozen=True)
class VariantSpec:
    """One configured variant: the image fit inside a `box` x `box` square, aspect kept."""

    name: str
    box: int

    def __str__(self) -> str:
        return f"{self.name}:{self.box}"


def parse_variants(text: str) -> tuple[VariantSpec, ...]:
    """PROFILES_VARIANTS: comma-separated `name:box` (empty for none); ValueError says what is wrong."""
    specs: list[VariantSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, box = item.partition(":")
        if VARIANT_NAME.fullmatch(name) is None:
            raise ValueError(f"variant name {name!r} must be a lowercase identifier ({VARIANT_NAME.pattern})")
        if not box.isdigit() or not 1 <= int(box) <= MAX_VARIANT_BOX:
            raise ValueError(f"variant {name!r} needs a size from 1 to {MAX_VARIANT_BOX}, as in {name}:256")
        if any(spec.name == name for spec in specs):
            raise ValueError(f"variant {name!r} is named twice")
        specs.append(VariantSpec(name, int(box)))
    return tuple(specs)


def variants_text(specs: tuple[VariantSpec, ...]) -> str:
    return ",".join(str(spec) for spec in specs)


class VariantFailed(Exception):
    """The staged image cannot be made into variants: retrying will not change that."""


@dataclass(frozen=True)
class Rendered:
    """One variant's bytes as encoded, with what the database records of it."""

    name: str
    data: bytes
    width: int
    height: int
    sha256: str
    content_type: str


def render_variants(source: bytes, wanted: Sequence[tuple[VariantSpec, VariantFormat]]) -> list[Rendered]:
    """Each wanted variant of `source`: orientation applied, first frame only, sRGB, fit inside its
    box (never enlarged), and no metadata at all (only pixels reach the encoder). The image is
    decoded once for all of them. CPU-bound: call it in a thread. Raises VariantFailed for an image
    Pillow cannot turn into variants."""
    if not wanted:
        return []
    try:
        with warnings.catch_warnings():
            # The API bounded the sides at PUT; the bomb warning adds nothing here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            base = _prepared(source, max(spec.box for spec, _ in wanted))
            # Boxes larger than the image give the same pixels (never enlarged): encoded once.
            encoded: dict[tuple[tuple[int, int], VariantFormat], Rendered] = {}
            made = []
            for spec, fmt in wanted:
                fitted = _fitted(base, spec.box)
                if (fitted.size, fmt) not in encoded:
                    encoded[(fitted.size, fmt)] = _encode(spec.name, fmt, fitted)
                made.append(dataclasses.replace(encoded[(fitted.size, fmt)], name=spec.name))
            return made
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, Image.DecompressionBombError) as exc:
        raise VariantFailed(f"the image cannot be made into variants: {exc.__class__.__name__}: {exc}") from None


def _prepared(source: bytes, largest_box: int) -> Image.Image:
    """The first frame, upright, in sRGB, in RGB or RGBA, at least `largest_box` on its longer side
    (or its own size), as bare pixels."""
    with Image.open(io.BytesIO(source), formats=OPENERS) as image:
        # JPEG can decode at a fraction of its size; the square box fits either orientation.
        image.draft("RGB", (largest_box, largest_box))
        image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image)
        icc = image.info.get("icc_profile")
    pixels = _to_srgb(upright, icc)
    # Only the pixels go on: no EXIF, XMP, ICC profile, comment or any other info block.
    return Image.frombytes(pixels.mode, pixels.size, pixels.tobytes())


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if image.mode in _WIDE_GREY:
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    mode = "RGBA" if has_alpha else "RGB"
    if icc:
        try:
            source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if image.mode not in ("RGB", "RGBA", "CMYK", "L"):
                image = image.convert(mode)
            converted = ImageCms.profileToProfile(image, source_profile, _SRGB, outputMode=mode)
            if converted is not None:
                return converted
        except ImageCms.PyCMSError:
            pass  # a broken profile: the pixels are taken as sRGB, as browsers do
    return image.convert(mode)


def _on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def _fitted(base: Image.Image, box: int) -> Image.Image:
    image = base.copy()
    image.thumbnail((box, box), Image.Resampling.LANCZOS)
    return image


def _encode(name: str, fmt: VariantFormat, image: Image.Image) -> Rendered:
    out = io.BytesIO()
    if fmt is VariantFormat.WEBP:
        image.save(out, "WEBP", quality=80, method=4)
    else:
        # JPEG has no alpha: transparent pixels show the white a page would most likely show.
        flat = _on_white(image) if image.mode == "RGBA" else image
        flat.save(out, "JPEG", quality=85, optimize=True)
    data = out.getvalue()
    return Rendered(name, data, image.width, image.height, hashlib.sha256(data).hexdigest(), fmt.content_type)

"""Streaming parse of the profile upload (multipart/form-data), with size caps enforced as it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from service.api.budget import Reservation
from service.api.problems import Problem
from service.domain import MAX_METADATA_BYTES

CHUNK_BYTES = 64 * 1024
# Boundaries, part headers and the metadata part, on top of the image itself.
FRAMING_ALLOWANCE = MAX_METADATA_BYTES + 16 * 1024
PARTS = ("metadata", "image")


@dataclass(frozen=True)
class Upload:
    metadata: bytes
    image: bytes


def _malformed(detail: str) -> Problem:
    return Problem(400, "Malformed body", detail, slug="malformed-body")


def _too_large(what: str, limit: int) -> Problem:
    return Problem(413, "Content too large", f"the {what} exceeds {limit} bytes", slug="too-large")


async def read_upload(request: web.Request, max_image_bytes: int, held: Reservation) -> Upload:
    """Read exactly one `metadata` and one `image` part, never buffering more than the caps, and
    charging what is buffered to the process's upload budget as it arrives."""
    max_body = max_image_bytes + FRAMING_ALLOWANCE
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large("request body", max_body)
    if request.content_length is not None:
        held.take(request.content_length)  # shed at once rather than after reading half of it
    charge = (lambda _size: None) if request.content_length is not None else held.take
    # The raw header: aiohttp's parsed content_type goes through the slow email package.
    if not request.headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
        raise _malformed("the body must be multipart/form-data with parts 'metadata' and 'image'")
    try:
        reader = await request.multipart()
        parts: dict[str, bytes] = {}
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _malformed("nested multipart bodies are not accepted")
            name = part.name or ""
            if name not in PARTS:
                raise _malformed(f"unexpected part {name!r}; only 'metadata' and 'image' are accepted")
            if name in parts:
                raise _malformed(f"part {name!r} appears more than once")
            limit = MAX_METADATA_BYTES if name == "metadata" else max_image_bytes
            parts[name] = await _read_capped(part, limit, name, charge)
    except ValueError as exc:  # aiohttp reports broken multipart framing as ValueError
        raise _malformed(f"the multipart body cannot be parsed: {exc}") from None
    missing = [name for name in PARTS if name not in parts]
    if missing:
        raise _malformed(f"missing part(s): {', '.join(missing)}")
    return Upload(parts["metadata"], parts["image"])


async def _read_capped(part: BodyPartReader, limit: int, name: str, charge: Callable[[int], None]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise _too_large(name if name == "image" else "metadata part", limit)
        charge(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)

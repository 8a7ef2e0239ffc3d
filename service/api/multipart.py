"""Streaming parse of the profile upload (multipart/form-data), with size caps enforced as it reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from service.api.budget import Reservation
from service.api.problems import Problem
from service.core.domain import MAX_METADATA_BYTES

CHUNK_BYTES = 64 * 1024
# Boundaries, part headers and the metadata part, on top of the image itself.
FRAMING_ALLOWANCE = MAX_METADATA_BYTES + 16 * 1024
# At its peak an upload holds its bytes twice: the parts as read next to the joined bytes, and later
# the bytes next to the driver's copy on their way to PostgreSQL.
BODY_COPIES = 2
# Exactly these two parts: a third one is refused at its headers, before its body is read.
PARTS = ("metadata", "image")
MAX_PART_HEADER_BYTES = 1024
MAX_PART_HEADERS = 8


@dataclass(frozen=True)
class Upload:
    metadata: bytes
    image: bytes


def _malformed(detail: str) -> Problem:
    return Problem(400, "Malformed body", detail, slug="malformed-body")


def _too_large(what: str, limit: int) -> Problem:
    return Problem(413, "Content too large", f"the {what} exceeds {limit} bytes", slug="too-large")


async def read_upload(request: web.Request, max_image_bytes: int, held: Reservation, deadline: float) -> Upload:
    """Read exactly one `metadata` and one `image` part within `deadline` seconds, never buffering
    more than the caps, and charging what it buffers to the process's upload budget as it arrives."""
    try:
        async with asyncio.timeout(deadline):
            return await _read_parts(request, max_image_bytes, held)
    except TimeoutError:
        raise Problem(
            408, "Request timeout", f"the request body did not arrive within {deadline:g} s", slug="body-timeout"
        ) from None


async def _read_parts(request: web.Request, max_image_bytes: int, held: Reservation) -> Upload:
    max_body = max_image_bytes + FRAMING_ALLOWANCE
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large("request body", max_body)
    if request.content_length is not None:
        held.take(BODY_COPIES * request.content_length)  # shed at once rather than after reading half of it
    charge = (
        (lambda _size: None) if request.content_length is not None else (lambda size: held.take(BODY_COPIES * size))
    )
    # The raw header: aiohttp's parsed content_type goes through the slow email package.
    if not request.headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
        raise _malformed("the body must be multipart/form-data with parts 'metadata' and 'image'")
    try:
        reader = MultipartReader(
            request.headers, request.content, max_field_size=MAX_PART_HEADER_BYTES, max_headers=MAX_PART_HEADERS
        )
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
    except (ValueError, BadHttpMessage) as exc:  # how aiohttp reports broken framing and oversized part headers
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

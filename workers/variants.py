"""The worker's side of variants: made from the staged bytes off the event loop, a bounded number at
once, then uploaded create-only and checksummed beside the original."""

from __future__ import annotations

import asyncio
import os

from service.core import metrics
from service.core.blobstore import BlobStore
from service.core.repository import Claim
from service.core.variants import Rendered, render_variants


class VariantMaker:
    """Makes variants in threads, never more at once than there are processors.

    Threads rather than a process pool: Pillow releases the GIL while it decodes, resamples and
    encodes, so threads use every core, and the staged bytes (up to the image limit) need not be
    copied to another process and back. The bytes were decoded in full by the same Pillow when the
    API accepted them, so what reaches a worker already opens and decodes; a failure here is a
    Python exception that fails the intent for good (VariantFailed), never a crash loop. The bound
    keeps a burst of large images from holding `worker_concurrency` decoded images in memory."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(os.cpu_count() or 1)

    async def make(self, claim: Claim, data: bytes) -> tuple[Rendered, ...]:
        if not claim.variants:
            return ()
        wanted = [(upload.spec, upload.format) for upload in claim.variants]
        async with self._slots:
            with metrics.VARIANT_RENDER.time():
                return tuple(await asyncio.to_thread(render_variants, data, wanted))


async def upload_all(
    blobs: BlobStore, claim: Claim, made: tuple[Rendered, ...], *, original: bytes | None = None
) -> None:
    """Every variant made, and the `original` if given, each create-only to the key the database
    chose for it."""
    keys = {upload.spec.name: upload.blob_key for upload in claim.variants}
    uploads = [(keys[v.name], v.data, v.sha256, v.content_type) for v in made]
    if original is not None:
        uploads.append((claim.blob_key, original, claim.sha256, claim.content_type))
    await asyncio.gather(*(_upload(blobs, *upload) for upload in uploads))


async def _upload(blobs: BlobStore, key: str, data: bytes, sha256: str, content_type: str) -> None:
    with metrics.UPLOAD_LATENCY.time():
        await blobs.put_once(key, data, sha256, content_type)
    metrics.UPLOAD_BYTES.inc(len(data))

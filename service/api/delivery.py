"""Redirect delivery: the image routes answer 307 to the blob store (presigned) or a CDN, which send the bytes."""

from __future__ import annotations

from aiohttp import web

from service.core import profiles
from service.core.blobstore import BlobStore, BlobStoreError
from service.core.repository import Pool, PublishedVersion, StoredImage
from service.core.settings import ImageDelivery, Settings

# 307, not 302: it keeps the method by definition, so a HEAD goes on as a HEAD (to a URL signed for HEAD).
REDIRECT_STATUS = 307
# A presigned target expires, the live route's target moves with every write, and a CDN target stops
# answering once its blob is collected, while the ETag names the bytes, not the target: a cache
# revalidating a kept redirect would get 304 and reuse an expired URL or a collected key. So no
# redirect is ever stored (a CDN caches the bytes at their own URL instead).
UNSTORED = "no-store"


def redirects(settings: Settings) -> bool:
    return settings.image_delivery is ImageDelivery.REDIRECT


async def live_as(pool: Pool, user_id: str, number: int) -> PublishedVersion | None:
    """Version `number` if it is the live one. Only a live version's blob is handed out: a superseded
    blob's collection is already counting down, and a URL handed out now could outlive it."""
    try:
        live = await profiles.live_version(pool, user_id)
    except profiles.ProfileNotFound:
        return None
    return live if live.version == number else None


async def _target(settings: Settings, blobs: BlobStore, key: str, *, head: bool) -> str:
    if settings.public_base_url is not None:
        return f"{settings.public_base_url.rstrip('/')}/{key}"
    try:
        return await blobs.presigned_url(key, head=head, expires_in=settings.presign_expiry_seconds)
    except BlobStoreError as exc:
        raise profiles.BlobUnavailable(str(exc)) from exc


async def redirect(settings: Settings, blobs: BlobStore, image: StoredImage, *, head: bool, etag: str) -> web.Response:
    """A 307 to where `image`'s bytes are, never stored by a cache."""
    location = await _target(settings, blobs, image.blob_key, head=head)
    return web.Response(status=REDIRECT_STATUS, headers={"Location": location, "ETag": etag, "Cache-Control": UNSTORED})

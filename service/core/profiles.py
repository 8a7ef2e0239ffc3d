"""The rules of writing and reading profiles: one transaction per write, consistent pairs on read."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from service.core import repository, tracing
from service.core.blobstore import BlobNotFound, BlobStore, BlobStoreError
from service.core.domain import FINISHED_STATES, Metadata, new_blob_key, request_fingerprint
from service.core.imagecache import ImageCache
from service.core.images import ImageInfo
from service.core.repository import Accepted, Intent, Pool, ProfileHead, PublishedVersion, StoredImage, VariantUpload
from service.core.settings import Settings


class ProfileNotFound(Exception):
    pass


class IntentNotFound(Exception):
    pass


class PreconditionFailed(Exception):
    pass


class IdempotencyInFlight(Exception):
    """A request with the same Idempotency-Key is still being handled."""


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with another body."""


class BlobUnavailable(Exception):
    """The live version's blob cannot be read, even after re-reading the pointer."""


class VariantNotMade(Exception):
    """The version has no such variant (yet): it was configured after the version was published."""


@dataclass(frozen=True)
class Preconditions:
    """If-Match: "<version>" (the newest accepted version) and If-None-Match: * on writes."""

    if_match: int | None = None
    if_none_match_any: bool = False

    @property
    def unconditional(self) -> bool:
        """Nothing to check: every field at its default (so a precondition added later counts too)."""
        return self == Preconditions()

    def check(self, head: ProfileHead | None) -> None:
        exists = head is not None and head.exists
        if self.if_none_match_any and exists:
            raise PreconditionFailed("the profile exists, but If-None-Match: * was given")
        if self.if_match is not None and (head is None or not exists or head.newest_version != self.if_match):
            newest = head.newest_version if head is not None and exists else "none"
            raise PreconditionFailed(f"If-Match is {self.if_match}, but the newest version is {newest}")


@dataclass(frozen=True, kw_only=True)
class PutRequest:
    """A checked write: metadata and image (already decoded and bounded), and how to apply it."""

    user_id: str
    metadata: Metadata
    image: ImageInfo
    data: bytes
    preconditions: Preconditions = field(default_factory=Preconditions)
    idempotency_key: str | None = None

    @property
    def fingerprint(self) -> str:
        return request_fingerprint(self.metadata, self.image.sha256)


async def accept_put(pool: Pool, settings: Settings, put: PutRequest) -> Accepted:
    """Record version, intent and staged bytes in ONE transaction; the blob store is not touched.
    With an Idempotency-Key used before (same body), what that write was accepted as."""
    async with pool.acquire(timeout=settings.db_acquire_timeout_seconds) as conn:
        if put.idempotency_key is None and put.preconditions.unconditional:
            # Nothing can refuse this write once it is recorded: its one statement is its own
            # transaction, which spares the round trips of BEGIN and COMMIT. As with a COMMIT whose
            # answer is lost, a client whose connection drops before the answer does not know
            # whether the write was recorded; an Idempotency-Key retry finds out.
            return await _record(conn, settings, put)
        async with conn.transaction():
            if put.idempotency_key is not None:
                earlier = await _earlier(conn, put, put.idempotency_key)
                if earlier is not None:
                    return earlier
            accepted = await _record(conn, settings, put)
            if put.idempotency_key is not None:
                await repository.save_idempotency_record(conn, put.idempotency_key, put.fingerprint, accepted)
        return accepted


async def _record(conn: repository.Connection, settings: Settings, put: PutRequest) -> Accepted:
    accepted, before = await repository.accept_put(
        conn,
        user_id=put.user_id,
        metadata=put.metadata.stored(),
        blob_key=new_blob_key(settings.s3_key_prefix),
        image=put.image,
        data=put.data,
        max_attempts=settings.max_attempts,
        traceparent=tracing.current_traceparent(),
        variants=[
            VariantUpload(spec=spec, format=settings.variant_format, blob_key=new_blob_key(settings.s3_key_prefix))
            for spec in settings.variants
        ],
    )
    # Checked after the write is recorded (one statement), inside its transaction: a refusal rolls it back.
    put.preconditions.check(before)
    return accepted


async def _earlier(conn: repository.Connection, put: PutRequest, key: str) -> Accepted | None:
    if not await repository.try_lock_idempotency_key(conn, put.user_id, key):
        raise IdempotencyInFlight
    stored = await repository.get_idempotency_record(conn, put.user_id, key)
    if stored is None:
        return None
    if stored.request_hash != put.fingerprint:
        raise IdempotencyMismatch
    return stored.accepted


async def accept_delete(pool: Pool, settings: Settings, user_id: str, preconditions: Preconditions) -> int:
    """Publish a tombstone at once: reads see 404, and no older version can go live after it."""
    async with pool.acquire(timeout=settings.db_acquire_timeout_seconds) as conn, conn.transaction():
        head = await repository.lock_existing_profile(conn, user_id)
        if head is None or not head.exists:
            raise ProfileNotFound
        preconditions.check(head)
        return await repository.accept_delete(conn, user_id)


async def live_version(pool: Pool, user_id: str) -> PublishedVersion:
    version = await repository.get_live_version(pool, user_id)
    if version is None:
        raise ProfileNotFound
    return version


async def intent(pool: Pool, intent_id: uuid.UUID) -> Intent:
    found = await repository.get_intent(pool, intent_id)
    if found is None:
        raise IntentNotFound
    return found


async def intent_finished(pool: Pool, intent_id: uuid.UUID) -> bool:
    found = await repository.get_intent(pool, intent_id)
    return found is not None and found.state in FINISHED_STATES


async def live_if_accepted(pool: Pool, accepted: Accepted) -> PublishedVersion | None:
    """The live version, if it is the accepted one."""
    live = await repository.get_live_version(pool, accepted.user_id)
    return live if live is not None and live.version == accepted.version else None


async def ping(pool: Pool) -> None:
    await repository.ping(pool)


def image_of(version: PublishedVersion, variant: str | None) -> StoredImage:
    """The version's original image (variant None) or one of its variants."""
    if variant is None:
        return version
    try:
        return version.variants[variant]
    except KeyError:
        raise VariantNotMade(f"version {version.version} has no variant {variant!r} yet") from None


async def read_live_image(
    pool: Pool, blobs: BlobStore, cache: ImageCache, live: PublishedVersion, variant: str | None = None
) -> tuple[PublishedVersion, StoredImage, bytes]:
    """The live version and the exact bytes of its image or `variant`, starting from `live` as just
    read. If the blob cannot be read the pointer may have just moved (and the old blob been
    collected), so the pointer is read once more before giving up."""
    try:
        return await _with_bytes(blobs, live, variant, cache)
    except BlobStoreError:
        again = await live_version(pool, live.user_id)
    try:
        return await _with_bytes(blobs, again, variant, cache)
    except BlobStoreError as exc:
        raise BlobUnavailable(str(exc)) from exc


async def _with_bytes(
    blobs: BlobStore, version: PublishedVersion, variant: str | None, cache: ImageCache | None = None
) -> tuple[PublishedVersion, StoredImage, bytes]:
    """With a cache only for a live version: its blob is needed, so it is never collected, while a
    superseded version's must answer 404 once it is."""
    image = image_of(version, variant)
    if cache is None:
        return version, image, await read_verified(blobs, image)
    return version, image, await cache.read_through(image.blob_key, image.sha256, partial(read_verified, blobs, image))


async def published_version(pool: Pool, user_id: str, number: int) -> PublishedVersion:
    version = await repository.get_published_version(pool, user_id, number)
    if version is None:
        raise ProfileNotFound
    return version


@contextmanager
def _collected_means_not_found() -> Iterator[None]:
    try:
        yield
    except BlobNotFound as exc:
        raise ProfileNotFound from exc
    except BlobStoreError as exc:
        raise BlobUnavailable(str(exc)) from exc


async def read_version_image(
    pool: Pool, blobs: BlobStore, user_id: str, number: int, variant: str | None = None
) -> tuple[PublishedVersion, StoredImage, bytes]:
    """A published version's bytes (of its image or `variant`); 404 once its blob has been collected."""
    version = await published_version(pool, user_id, number)
    with _collected_means_not_found():
        return await _with_bytes(blobs, version, variant)


async def head_version_image(
    pool: Pool, blobs: BlobStore, user_id: str, number: int, variant: str | None = None
) -> StoredImage:
    """What HEAD of a published version's image answers: as GET would, so 404 once collected."""
    image = image_of(await published_version(pool, user_id, number), variant)
    with _collected_means_not_found():
        await blobs.head(image.blob_key)
    return image


async def read_verified(blobs: BlobStore, image: StoredImage) -> bytes:
    """Read an image's blob and refuse it unless it is byte for byte the one that was verified."""
    data = await blobs.read(image.blob_key)
    if len(data) != image.size or hashlib.sha256(data).hexdigest() != image.sha256:
        raise BlobStoreError(f"{image.blob_key} does not hold the bytes that were verified")
    return data

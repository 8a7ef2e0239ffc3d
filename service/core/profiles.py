"""The rules of writing and reading profiles: one transaction per write, consistent pairs on read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.core import repository
from service.core.blobstore import BlobNotFound, BlobStore, BlobStoreError
from service.core.repository import Accepted, NewImage, Pool, ProfileHead, StoredResponse, Version


class ProfileNotFound(Exception):
    pass


class PreconditionFailed(Exception):
    pass


class IdempotencyInFlight(Exception):
    """A request with the same Idempotency-Key is still being handled."""


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with another body."""


class BlobUnavailable(Exception):
    """The live version's blob cannot be read, even after re-reading the pointer."""


@dataclass(frozen=True)
class Preconditions:
    """If-Match: "<version>" (the newest accepted version) and If-None-Match: * on writes."""

    if_match: int | None = None
    if_none_match_any: bool = False

    def check(self, head: ProfileHead | None) -> None:
        exists = head is not None and head.exists
        if self.if_none_match_any and exists:
            raise PreconditionFailed("the profile exists, but If-None-Match: * was given")
        if self.if_match is not None and (head is None or not exists or head.newest_version != self.if_match):
            newest = head.newest_version if head is not None and exists else "none"
            raise PreconditionFailed(f"If-Match is {self.if_match}, but the newest version is {newest}")


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    fingerprint: str


async def accept_put(
    pool: Pool,
    acquire_timeout: float,
    user_id: str,
    image: NewImage,
    max_attempts: int,
    preconditions: Preconditions,
    idempotency: IdempotencyKey | None,
    respond: Callable[[Accepted], StoredResponse],
) -> StoredResponse:
    """Record version, intent and staged bytes in ONE transaction; the blob store is not touched."""
    async with pool.acquire(timeout=acquire_timeout) as conn, conn.transaction():
        if idempotency is not None:
            replay = await _replay(conn, user_id, idempotency)
            if replay is not None:
                return replay
        preconditions.check(await repository.lock_profile_for_write(conn, user_id))
        accepted = await repository.accept_put(conn, user_id, image, max_attempts)
        response = respond(accepted)
        if idempotency is not None:
            await repository.save_idempotency_record(conn, user_id, idempotency.key, response)
    return response


async def _replay(conn: repository.Connection, user_id: str, idempotency: IdempotencyKey) -> StoredResponse | None:
    if not await repository.try_lock_idempotency_key(conn, user_id, idempotency.key):
        raise IdempotencyInFlight
    stored = await repository.get_idempotency_record(conn, user_id, idempotency.key)
    if stored is not None and stored.request_hash != idempotency.fingerprint:
        raise IdempotencyMismatch
    return stored


async def accept_delete(pool: Pool, acquire_timeout: float, user_id: str, preconditions: Preconditions) -> int:
    """Publish a tombstone at once: reads see 404, and no older version can go live after it."""
    async with pool.acquire(timeout=acquire_timeout) as conn, conn.transaction():
        head = await repository.lock_existing_profile(conn, user_id)
        if head is None or not head.exists:
            raise ProfileNotFound
        preconditions.check(head)
        return await repository.accept_delete(conn, user_id)


async def live_version(pool: Pool, user_id: str) -> Version:
    version = await repository.get_live_version(pool, user_id)
    if version is None or version.is_tombstone:
        raise ProfileNotFound
    return version


async def read_live_image(pool: Pool, blobs: BlobStore, user_id: str) -> tuple[Version, bytes]:
    """The live version and its exact bytes. If the blob cannot be read the pointer may have just
    moved (and the old blob been collected), so the pointer is read once more before giving up."""
    version = await live_version(pool, user_id)
    try:
        return version, await read_verified(blobs, version)
    except BlobStoreError:
        again = await live_version(pool, user_id)
    try:
        return again, await read_verified(blobs, again)
    except BlobStoreError as exc:
        raise BlobUnavailable(str(exc)) from exc


async def published_version(pool: Pool, user_id: str, number: int) -> Version:
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


async def read_version_image(pool: Pool, blobs: BlobStore, user_id: str, number: int) -> tuple[Version, bytes]:
    """A published version's bytes; 404 once its blob has been collected."""
    version = await published_version(pool, user_id, number)
    with _collected_means_not_found():
        return version, await read_verified(blobs, version)


async def head_version_image(pool: Pool, blobs: BlobStore, user_id: str, number: int) -> Version:
    """What HEAD of a published version's image answers: as GET would, so 404 once collected."""
    version = await published_version(pool, user_id, number)
    assert version.blob_key is not None
    with _collected_means_not_found():
        await blobs.head(version.blob_key)
    return version


async def read_verified(blobs: BlobStore, version: Version) -> bytes:
    """Read a version's blob and refuse it unless it is byte for byte the one that was verified."""
    assert version.blob_key is not None
    data = await blobs.read(version.blob_key)
    if len(data) != version.size or hashlib.sha256(data).hexdigest() != version.sha256:
        raise BlobStoreError(f"{version.blob_key} does not hold the bytes of version {version.version}")
    return data

"""The live image cache under attack: it never answers bytes other than the live pointer's, never
past an access check, stays within its bound, and answers hits (only hits) while S3 is down."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import io
import tracemalloc
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from service.core.blobstore import BlobStore, BlobStoreError
from service.core.imagecache import ENTRY_OVERHEAD, LARGEST_SHARE, ImageCache
from service.core.repository import Pool
from service.core.settings import Settings
from service.core.variants import VariantFormat, VariantSpec, render_variants
from tests.support import (
    ADMIN_SCOPE,
    JWT_SECRET,
    MakeClient,
    StallingS3,
    accepted,
    assert_problem,
    bearer,
    blob_key,
    png,
    publish_due,
    put_profile,
    solid,
)
from workers.variant_walk import VariantWalk

THUMB_64 = VariantSpec("thumb", 64)
SMALL_32 = VariantSpec("small", 32)


def configured(settings: Settings, *variants: VariantSpec, **more: Any) -> Settings:
    return settings.model_copy(update={"variants": variants, **more})


async def variant_key(pool: Pool, user: str, name: str) -> str:
    key: str = await pool.fetchval(
        "SELECT v.blob_key FROM version_variants v JOIN profiles p"
        " ON p.user_id = v.user_id AND p.live_version = v.version WHERE v.user_id = $1 AND v.name = $2",
        user,
        name,
    )
    return key


def longest_side(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return max(image.size)


async def test_a_variant_remade_at_another_size_and_back_is_never_answered_from_bytes_cached_for_an_older_key(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    big, tiny = configured(settings, THUMB_64), configured(settings, VariantSpec("thumb", 16))
    client = await make_client(big)  # one API process, so one cache, across every configuration below
    await accepted(client, "rex", {"display_name": "rex"}, solid((200, 40, 40)))
    await publish_due(big)
    first_key = await variant_key(pool, "rex", "thumb")
    first = await (await client.get("/v1/profiles/rex/image?variant=thumb")).read()
    assert longest_side(first) == 64

    assert await VariantWalk(tiny, pool).round() == 1  # re-keyed: the new row waits for its bytes
    await assert_problem(await client.get("/v1/profiles/rex/image?variant=thumb"), 404)
    await publish_due(tiny)
    remade = await client.get("/v1/profiles/rex/image?variant=thumb")
    assert remade.status == 200 and longest_side(await remade.read()) == 16

    assert await VariantWalk(big, pool).round() == 1  # the configuration rolled back
    await publish_due(big)
    back_key = await variant_key(pool, "rex", "thumb")
    assert back_key != first_key
    await blobs.delete(first_key)  # whatever the old key still held, it is not what is served
    again = await client.get("/v1/profiles/rex/image?variant=thumb")
    data = await again.read()
    assert again.status == 200 and longest_side(data) == 64
    assert again.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'


async def test_a_variant_the_walk_removed_is_not_answered_from_memory_by_an_api_still_configured_with_it(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, THUMB_64, SMALL_32)
    client = await make_client(before)
    await accepted(client, "sol", {"display_name": "sol"}, solid((40, 200, 40)))
    await publish_due(before)
    assert (await client.get("/v1/profiles/sol/image?variant=small")).status == 200

    assert await VariantWalk(configured(settings, THUMB_64), pool).round() == 1
    missing = await assert_problem(await client.get("/v1/profiles/sol/image?variant=small"), 404)
    assert missing["title"] == "Variant not yet made"


async def test_a_cached_image_answers_with_the_headers_of_its_own_bytes_and_head_agrees(
    make_client: MakeClient, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    client = await make_client(configured(settings))
    await accepted(client, "tom", {"display_name": "tom"}, png(90))
    await publish_due(settings)
    assert (await client.get("/v1/profiles/tom/image")).status == 200
    await blobs.delete(await blob_key(db_url, "tom", 1))  # from here on only memory has the bytes

    hit = await client.get("/v1/profiles/tom/image")
    body = await hit.read()
    assert hit.status == 200 and body == png(90)
    assert hit.headers["Content-Length"] == str(len(body))
    assert hit.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    head = await client.head("/v1/profiles/tom/image")
    assert (head.headers["ETag"], head.headers["Content-Length"]) == (hit.headers["ETag"], str(len(body)))
    unchanged = await client.get("/v1/profiles/tom/image", headers={"If-None-Match": hit.headers["ETag"]})
    assert unchanged.status == 304 and await unchanged.read() == b""
    embedded = await (await client.get("/v1/profiles/tom?embed=image")).json()
    assert base64.b64decode(embedded["image"]["data"]) == body and embedded["image"]["size"] == len(body)


async def test_an_original_cached_for_an_admin_is_still_refused_to_every_other_caller(
    make_client: MakeClient, settings: Settings
) -> None:
    private = configured(
        settings,
        THUMB_64,
        auth_jwt_secret=SecretStr(JWT_SECRET),
        public_originals=False,
        auth_reads_require_token=True,
    )
    client = await make_client(private)
    assert (await put_profile(client, "uma", {"display_name": "uma"}, png(91), bearer("uma"))).status == 202
    await publish_due(private)
    admin = bearer("ops", scope=ADMIN_SCOPE)
    for route in ("/v1/profiles/uma/image", "/v1/profiles/uma?embed=image"):
        assert (await client.get(route, headers=admin)).status == 200, route  # now in memory

        refused = await assert_problem(await client.get(route, headers=bearer("uma")), 403)
        assert refused["title"] == "Original not public"
        await assert_problem(await client.get(route), 401)
    thumb = await client.get("/v1/profiles/uma/image?variant=thumb", headers=bearer("anyone"))
    assert thumb.status == 200 and longest_side(await thumb.read()) == 32  # png(91) is 32 x 24: not enlarged
    assert thumb.content_type == "image/webp"


async def test_many_concurrent_first_reads_of_one_image_all_get_its_exact_bytes_and_leave_it_in_memory(
    make_client: MakeClient, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    client = await make_client(configured(settings))
    await accepted(client, "vic", {"display_name": "vic"}, png(92))
    await publish_due(settings)
    answers = await asyncio.gather(*(client.get("/v1/profiles/vic/image") for _ in range(16)))
    assert [(a.status, await a.read()) for a in answers] == [(200, png(92))] * 16

    await blobs.delete(await blob_key(db_url, "vic", 1))
    assert await (await client.get("/v1/profiles/vic/image")).read() == png(92)


async def test_with_s3_refusing_connections_a_cached_image_answers_and_an_uncached_one_is_503_with_retry_after(
    make_client: MakeClient, settings: Settings
) -> None:
    assert settings.s3_endpoint_url is not None
    proxy = await StallingS3(settings.s3_endpoint_url, stall_on="\x00").start()  # passes everything on
    try:
        client = await make_client(configured(settings, s3_endpoint_url=proxy.url))
        await accepted(client, "wes", {"display_name": "wes"}, png(93))
        await accepted(client, "xia", {"display_name": "xia"}, png(94))
        await publish_due(settings)
        assert await (await client.get("/v1/profiles/wes/image")).read() == png(93)
    finally:
        await proxy.close()  # the store's port now refuses connections

    assert await (await client.get("/v1/profiles/wes/image")).read() == png(93)
    embedded = await (await client.get("/v1/profiles/wes?embed=image")).json()
    assert base64.b64decode(embedded["image"]["data"]) == png(93)
    for route in ("/v1/profiles/xia/image", "/v1/profiles/xia?embed=image"):
        down = await client.get(route)
        await assert_problem(down, 503)
        assert down.headers["Retry-After"] == str(settings.retry_after_seconds), route
    assert (await client.head("/v1/profiles/xia/image")).status == 200  # HEAD reads only the database


async def test_a_read_that_hung_past_its_requests_deadline_does_not_fail_the_next_request_for_that_image(
    make_client: MakeClient, settings: Settings, db_url: str
) -> None:
    # One S3 connection hangs while the store keeps answering: the request it held answers 503 at
    # its deadline, and nothing is left waiting on that connection for the requests after it.
    assert settings.s3_endpoint_url is not None
    await accepted(await make_client(settings), "yan", {"display_name": "yan"}, png(95))
    await publish_due(settings)
    proxy = await StallingS3(settings.s3_endpoint_url, stall_on=await blob_key(db_url, "yan", 1), times=1).start()
    try:
        client = await make_client(configured(settings, s3_endpoint_url=proxy.url, request_timeout_seconds=2.0))
        await assert_problem(await client.get("/v1/profiles/yan/image"), 503)
        assert proxy.stalled.is_set()
        after = await client.get("/v1/profiles/yan/image")
        assert (after.status, await after.read()) == (200, png(95))
    finally:
        await proxy.close()


# Longer than any read these tests make: what bounds a shared read has a test of its own.
READ_TIMEOUT = 30.0


async def test_a_shared_read_that_never_ends_is_given_up_as_a_store_error_and_the_next_miss_reads_again() -> None:
    cache = ImageCache(1 << 20, read_timeout=0.05)
    never = asyncio.Event()

    async def hung_read() -> bytes:
        await never.wait()
        return b"never"

    with pytest.raises(BlobStoreError):
        await cache.read_through("k", "s", hung_read)
    await _put(cache, "k", "s", b"the bytes")
    assert await _held(cache, "k", "s") == b"the bytes"


async def test_an_image_cache_keeps_at_most_its_bound_stores_nothing_over_its_share_and_nothing_when_off() -> None:
    bound = 64 * 1024
    cache = ImageCache(bound, READ_TIMEOUT)
    # The largest image an entry may hold: its share, less what the entry costs beside its bytes.
    largest = bound // LARGEST_SHARE - ENTRY_OVERHEAD
    entries = {(f"k{n}", f"s{n}"): bytes([n]) * largest for n in range(3 * LARGEST_SHARE)}
    for (key, sha), data in entries.items():
        await _put(cache, key, sha, data)
    kept = [data for (key, sha), data in entries.items() if await _held(cache, key, sha) == data]
    assert sum(len(data) + ENTRY_OVERHEAD for data in kept) <= bound and len(kept) == LARGEST_SHARE
    assert await _held(cache, "k0", "s0") is None  # least recently used out first

    await _put(cache, "big", "s", b"x" * (largest + 1))
    assert await _held(cache, "big", "s") is None
    off = ImageCache(0, READ_TIMEOUT)
    await _put(off, "k", "s", b"x")
    assert await _held(off, "k", "s") is None


async def test_concurrent_misses_of_one_image_share_one_read_that_a_reader_giving_up_does_not_cancel() -> None:
    cache = ImageCache(1 << 20, READ_TIMEOUT)
    started, release = asyncio.Event(), asyncio.Event()
    reads = 0

    async def slow_read() -> bytes:
        nonlocal reads
        reads += 1
        started.set()
        await release.wait()
        return b"the bytes"

    first = asyncio.create_task(cache.read_through("k", "s", slow_read))
    await started.wait()
    others = [asyncio.create_task(cache.read_through("k", "s", slow_read)) for _ in range(5)]
    await asyncio.sleep(0)  # one turn of the loop: the others are waiting for the same read now
    first.cancel()
    release.set()
    assert await asyncio.gather(*others) == [b"the bytes"] * 5
    assert reads == 1
    assert await _held(cache, "k", "s") == b"the bytes"


async def test_a_failed_read_fails_every_reader_waiting_for_it_stores_nothing_and_the_next_read_tries_again() -> None:
    cache = ImageCache(1 << 20, READ_TIMEOUT)
    release = asyncio.Event()

    async def failing_read() -> bytes:
        await release.wait()
        raise BlobStoreError("the store did not answer")

    waiting = [asyncio.create_task(cache.read_through("k", "s", failing_read)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(outcome, BlobStoreError) for outcome in outcomes), outcomes
    assert await _held(cache, "k", "s") is None
    await _put(cache, "k", "s", b"later")
    assert await _held(cache, "k", "s") == b"later"


async def test_an_image_cache_of_n_bytes_keeps_at_most_n_bytes_of_memory_when_it_holds_thumbnails_of_flat_images() -> (
    None
):
    # A flat-colour avatar (initials on a plain background, say) makes a 64-pixel WebP of a few
    # dozen bytes: the cache must count what each entry really costs, keys and bookkeeping too.
    (thumb,) = render_variants(solid((30, 90, 200)), [(THUMB_64, VariantFormat.WEBP)])
    bound = 1024 * 1024
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        cache = await _filled(bound, thumb.data)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    newest = _entry(bound // len(thumb.data) - 1, thumb.data)
    assert await _held(cache, newest[0], newest[1]) is not None  # it really holds them
    assert held <= bound * 1.1, f"a cache bounded at {bound} bytes holds {held} ({held / bound:.1f} x)"


def _entry(n: int, thumb: bytes) -> tuple[str, str, bytes]:
    """The n-th distinct thumbnail of `thumb`'s size, under a key of the service's shape and length."""
    data = thumb[:-4] + n.to_bytes(4, "big")
    return f"t_0123456789ab/{n:032x}", hashlib.sha256(data).hexdigest(), data


async def _filled(bound: int, thumb: bytes) -> ImageCache:
    cache = ImageCache(bound, READ_TIMEOUT)
    for n in range(bound // len(thumb)):
        await _put(cache, *_entry(n, thumb))
    return cache


async def _put(cache: ImageCache, blob_key: str, sha256: str, data: bytes) -> None:
    """A miss of the entry whose read returns `data`."""

    async def read() -> bytes:
        return data

    assert await cache.read_through(blob_key, sha256, read) == data


async def _held(cache: ImageCache, blob_key: str, sha256: str) -> bytes | None:
    """What the cache holds for the entry: a miss would read, and this read fails."""

    async def unreadable() -> bytes:
        raise LookupError(blob_key)

    try:
        return await cache.read_through(blob_key, sha256, unreadable)
    except LookupError:
        return None

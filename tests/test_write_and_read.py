"""The write and read paths end to end, with in-process workers, against real PostgreSQL and S3."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib

from service.core.blobstore import BlobNotFound, BlobStore
from service.core.settings import Settings
from tests.support import (
    Client,
    MakeClient,
    StartWorker,
    accepted,
    blob_key,
    finished_intent,
    png,
    publish_due,
    wait_live,
)


async def test_a_write_goes_live_with_its_exact_metadata_and_image(
    client: Client,
    start_worker: StartWorker,
) -> None:
    image = png(1)
    body = await accepted(client, "ada", {"display_name": "Ada", "bio": "analyst"}, image)
    assert body["version"] == 1 and body["state"] == "pending"
    assert body["status_url"] == f"/v1/intents/{body['intent_id']}"
    await start_worker()
    await wait_live(client, "ada", 1)

    profile = await (await client.get("/v1/profiles/ada?embed=image")).json()
    assert profile["metadata"] == {"display_name": "Ada", "bio": "analyst"}
    assert base64.b64decode(profile["image"]["data"]) == image
    assert profile["image"]["sha256"] == hashlib.sha256(image).hexdigest()
    assert (profile["image"]["width"], profile["image"]["height"]) == (32, 24)
    live = await client.get("/v1/profiles/ada/image")
    assert live.status == 200 and await live.read() == image
    assert live.headers["Content-Type"] == "image/png" and live.headers["Cache-Control"] == "no-cache"
    intent = await (await client.get(body["status_url"])).json()
    assert intent["state"] == "done" and intent["attempts"] == 1 and intent["kind"] == "put"


async def test_reading_a_profile_nobody_wrote_is_404(client: Client) -> None:
    for path in (
        "/v1/profiles/nobody",
        "/v1/profiles/nobody?embed=image",
        "/v1/profiles/nobody/image",
        "/v1/profiles/nobody/versions/1/image",
    ):
        response = await client.get(path)
        assert response.status == 404, path
        assert response.content_type == "application/problem+json"


async def test_an_update_goes_live_under_a_new_key_and_the_old_blob_stays_untouched(
    client: Client,
    start_worker: StartWorker,
    blobs: BlobStore,
    db_url: str,
) -> None:
    await start_worker()
    first, second = png(10), png(11)
    await accepted(client, "bob", {"display_name": "Bob"}, first)
    await wait_live(client, "bob", 1)
    await accepted(client, "bob", {"display_name": "Bobby"}, second)
    await wait_live(client, "bob", 2)

    old_key, new_key = await blob_key(db_url, "bob", 1), await blob_key(db_url, "bob", 2)
    assert old_key != new_key and "bob" not in old_key
    assert await blobs.read(old_key) == first
    assert await blobs.read(new_key) == second
    old = await client.get("/v1/profiles/bob/versions/1/image")
    assert await old.read() == first
    assert old.headers["Cache-Control"] == "public, max-age=60, immutable"


async def test_two_users_with_identical_image_bytes_get_distinct_keys(
    client: Client,
    start_worker: StartWorker,
    db_url: str,
) -> None:
    await start_worker()
    image = png(20)
    for user in ("twin-a", "twin-b"):
        await accepted(client, user, {"display_name": user}, image)
    for user in ("twin-a", "twin-b"):
        await wait_live(client, user, 1)
    assert await blob_key(db_url, "twin-a", 1) != await blob_key(db_url, "twin-b", 1)


async def test_readers_never_see_new_metadata_before_its_image(
    client: Client,
    start_worker: StartWorker,
) -> None:
    old_image, new_image = png(30), png(31)
    pairs = {("Old", old_image), ("New", new_image)}
    await start_worker()
    await accepted(client, "carol", {"display_name": "Old"}, old_image)
    await wait_live(client, "carol", 1)
    seen: list[tuple[str, bytes]] = []
    writing = asyncio.Event()

    async def read_until_new() -> None:
        while True:
            response = await client.get("/v1/profiles/carol?embed=image")
            assert response.status == 200
            body = await response.json()
            pair = (body["metadata"]["display_name"], base64.b64decode(body["image"]["data"]))
            assert pair in pairs, "a read mixed two writes"
            seen.append(pair)
            writing.set()
            if pair[0] == "New":
                return

    reader = asyncio.create_task(read_until_new())
    await writing.wait()
    await accepted(client, "carol", {"display_name": "New"}, new_image)
    await asyncio.wait_for(reader, 30)
    assert seen[0] == ("Old", old_image) and seen[-1] == ("New", new_image)


async def test_a_pending_write_is_invisible_until_a_worker_publishes_it(client: Client) -> None:
    await accepted(client, "dave", {"display_name": "Dave"}, png(40))
    assert (await client.get("/v1/profiles/dave")).status == 404
    assert (await client.get("/v1/profiles/dave/image")).status == 404


async def test_concurrent_writers_for_one_user_leave_the_newest_accepted_version_live(
    client: Client,
    start_worker: StartWorker,
) -> None:
    await start_worker()
    written = {f"writer-{i}": png(100 + i) for i in range(8)}
    bodies = await asyncio.gather(
        *(accepted(client, "erin", {"display_name": name}, image) for name, image in written.items())
    )
    versions = sorted(body["version"] for body in bodies)
    assert versions == list(range(1, 9))
    newest = max(bodies, key=lambda b: b["version"])

    async def read_pairs() -> None:
        for _ in range(20):
            response = await client.get("/v1/profiles/erin?embed=image")
            if response.status == 200:
                body = await response.json()
                assert written[body["metadata"]["display_name"]] == base64.b64decode(body["image"]["data"])

    await asyncio.gather(read_pairs(), read_pairs())
    await wait_live(client, "erin", newest["version"])
    final = await (await client.get("/v1/profiles/erin?embed=image")).json()
    assert base64.b64decode(final["image"]["data"]) == written[final["metadata"]["display_name"]]


async def test_delete_racing_a_pending_write_keeps_the_profile_deleted_and_put_after_delete_works(
    client: Client,
    start_worker: StartWorker,
    blobs: BlobStore,
    db_url: str,
    settings: Settings,
) -> None:
    await accepted(client, "fay", {"display_name": "Fay"}, png(50))
    assert await publish_due(settings) == 1
    pending = await accepted(client, "fay", {"display_name": "Fay again"}, png(51))
    deleted = await client.delete("/v1/profiles/fay")
    assert deleted.status == 204
    assert (await client.get("/v1/profiles/fay")).status == 404
    await start_worker()
    await finished_intent(db_url, pending["intent_id"])
    intent = await (await client.get(pending["status_url"])).json()
    assert intent["state"] == "superseded"
    assert (await client.get("/v1/profiles/fay")).status == 404
    assert (await client.get("/v1/profiles/fay/image")).status == 404
    assert (await client.delete("/v1/profiles/fay")).status == 404
    with contextlib.suppress(BlobNotFound):
        await blobs.head(await blob_key(db_url, "fay", 2))
        raise AssertionError("a superseded version must not be uploaded")

    after = await accepted(client, "fay", {"display_name": "Fay returns"}, png(52))
    assert after["version"] == 4
    await wait_live(client, "fay", 4)


async def test_an_image_collected_from_the_store_is_never_served_half(
    client: Client,
    start_worker: StartWorker,
    blobs: BlobStore,
    db_url: str,
) -> None:
    await start_worker()
    await accepted(client, "gus", {"display_name": "Gus"}, png(60))
    await wait_live(client, "gus", 1)
    key = await blob_key(db_url, "gus", 1)
    await blobs.delete(key)

    embedded = await client.get("/v1/profiles/gus?embed=image")
    assert embedded.status == 503 and "Retry-After" in embedded.headers
    assert (await client.get("/v1/profiles/gus/image")).status == 503
    assert (await client.get("/v1/profiles/gus/versions/1/image")).status == 404
    with contextlib.suppress(BlobNotFound):
        await blobs.head(key)
        raise AssertionError("the blob should be gone")


async def test_after_a_delete_answered_no_version_at_or_below_its_tombstone_is_served(
    client: Client, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    for n in (1, 2):
        await accepted(client, "ren", {"display_name": f"v{n}"}, png(70 + n))
    assert await publish_due(settings) == 2
    assert (await client.get("/v1/profiles/ren/versions/1/image")).status == 200  # superseded, not collected
    assert (await client.delete("/v1/profiles/ren")).status == 204
    for route in ("/versions/1/image", "/versions/2/image", "/image", ""):
        for method in ("GET", "HEAD"):
            response = await client.request(method, f"/v1/profiles/ren{route}")
            assert response.status == 404, (method, route)
    assert await blobs.read(await blob_key(db_url, "ren", 2)) == png(72)  # still there: collected later

    await accepted(client, "ren", {"display_name": "v4"}, png(74))
    assert await publish_due(settings) == 1
    assert await (await client.get("/v1/profiles/ren/versions/4/image")).read() == png(74)
    assert (await client.get("/v1/profiles/ren/versions/2/image")).status == 404


async def test_head_and_get_of_a_collected_versions_image_both_answer_404(
    client: Client, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    for n in (1, 2):
        await accepted(client, "val", {"display_name": f"v{n}"}, png(90 + n))
    assert await publish_due(settings) == 2
    assert (await client.head("/v1/profiles/val/versions/1/image")).status == 200
    await blobs.delete(await blob_key(db_url, "val", 1))  # what the collector does after the grace period
    for method in ("HEAD", "GET"):
        assert (await client.request(method, "/v1/profiles/val/versions/1/image")).status == 404, method


async def test_a_live_image_once_read_comes_from_memory_while_every_read_still_follows_the_pointer(
    client: Client, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    await accepted(client, "ivy", {"display_name": "v1"}, png(80))
    assert await publish_due(settings) == 1
    assert await (await client.get("/v1/profiles/ivy/image")).read() == png(80)
    await blobs.delete(await blob_key(db_url, "ivy", 1))  # the store no longer has it: only memory does
    again = await client.get("/v1/profiles/ivy/image")
    assert again.status == 200 and await again.read() == png(80)
    embedded = await (await client.get("/v1/profiles/ivy?embed=image")).json()
    assert base64.b64decode(embedded["image"]["data"]) == png(80)

    await accepted(client, "ivy", {"display_name": "v2"}, png(81))
    assert await publish_due(settings) == 1
    assert await (await client.get("/v1/profiles/ivy/image")).read() == png(81)
    assert (await client.get("/v1/profiles/ivy/versions/1/image")).status == 404  # versions are read from the store
    assert (await client.delete("/v1/profiles/ivy")).status == 204
    assert (await client.get("/v1/profiles/ivy/image")).status == 404


async def test_with_the_image_cache_off_every_live_read_goes_to_the_store(
    make_client: MakeClient, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    client = await make_client(settings.model_copy(update={"image_cache_bytes": 0}))
    await accepted(client, "oto", {"display_name": "v1"}, png(82))
    assert await publish_due(settings) == 1
    assert await (await client.get("/v1/profiles/oto/image")).read() == png(82)
    await blobs.delete(await blob_key(db_url, "oto", 1))
    assert (await client.get("/v1/profiles/oto/image")).status == 503


async def test_a_caller_holding_the_live_image_gets_304_from_the_database_alone(
    make_client: MakeClient, settings: Settings, blobs: BlobStore, db_url: str
) -> None:
    client = await make_client(settings.model_copy(update={"image_cache_bytes": 0}))
    await accepted(client, "pia", {"display_name": "v1"}, png(83))
    assert await publish_due(settings) == 1
    etag = (await client.get("/v1/profiles/pia/image")).headers["ETag"]
    await blobs.delete(await blob_key(db_url, "pia", 1))  # the store cannot answer for it any more
    unchanged = await client.get("/v1/profiles/pia/image", headers={"If-None-Match": etag})
    assert unchanged.status == 304 and unchanged.headers["ETag"] == etag
    assert (await client.get("/v1/profiles/pia/image")).status == 503

"""The variant walk: live versions get the variants configured after they went live (made from their
published original, attached by a fenced statement, a bounded number at a time) and lose the ones
no longer configured (their blobs collected); replacement, lost leases, death and replay keep every
version whole."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import asyncpg
import pytest
from PIL import Image

from service.core import operations, repository
from service.core.blobstore import BlobNotFound, BlobStore
from service.core.domain import IntentPurpose, IntentState
from service.core.queries import query
from service.core.repository import Claim, IntentFilter, Pool
from service.core.settings import Settings
from service.core.variants import VariantSpec, render_variants
from tests.support import (
    Client,
    MakeClient,
    StartWorker,
    accepted,
    assert_problem,
    close_to,
    colour_of,
    eventually,
    finished_intent,
    let_grace_pass,
    publish_due,
    solid,
    until_blocked,
    until_intents_finish,
)
from workers.maintenance import Collector, prune
from workers.outbox import Worker
from workers.variant_walk import VariantWalk
from workers.variants import upload_all

THUMB = (VariantSpec("thumb", 64),)
THUMB_AND_SMALL = (VariantSpec("thumb", 64), VariantSpec("small", 32))


def configured(settings: Settings, *variants: VariantSpec, **more: Any) -> Settings:
    return settings.model_copy(update={"variants": variants, **more})


async def publish(client: Client, settings: Settings, colours: dict[str, tuple[int, int, int]]) -> None:
    """Each user's write accepted by `client`, then published by a worker with `settings`."""
    for user, colour in colours.items():
        await accepted(client, user, {"display_name": user}, solid(colour))
    await publish_due(settings)


async def variant_rows(pool: Pool, user: str, version: int) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM version_variants WHERE user_id = $1 AND version = $2", user, version)
    return {row["name"]: row for row in rows}


async def adding(pool: Pool) -> list[repository.ListedIntent]:
    """The add_variants intents, oldest first."""
    listed = await operations.list_intents(pool, IntentFilter(), 100)
    return [intent for intent in listed if intent.purpose is IntentPurpose.ADD_VARIANTS]


async def claim_one(pool: Pool) -> Claim:
    (claim,) = await repository.claim_intents(pool, 10, "test-worker", 10.0)
    return claim


async def deletion_reason(pool: Pool, key: str) -> str | None:
    reason: str | None = await pool.fetchval("SELECT reason FROM blob_deletions WHERE blob_key = $1", key)
    return reason


def sides(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_a_variant_added_later_is_made_for_every_live_version_from_its_own_original(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"ana": (200, 30, 30)})
    await publish(await make_client(before), before, {"ana": (30, 200, 30), "ben": (30, 30, 200)})
    after = configured(settings, *THUMB_AND_SMALL)
    client = await make_client(after)
    missing = await assert_problem(await client.get("/v1/profiles/ana/image?variant=small"), 404)
    assert missing["title"] == "Variant not yet made"

    assert await VariantWalk(after, pool).round() == 2  # the live versions: ana's second, ben's first
    queued = await adding(pool)
    assert [(i.user_id, i.version, i.state) for i in queued] == [("ana", 2, "pending"), ("ben", 1, "pending")]
    assert await publish_due(after) == 2

    for user, colour in (("ana", (30, 200, 30)), ("ben", (30, 30, 200))):
        small = await client.get(f"/v1/profiles/{user}/image?variant=small")
        assert small.status == 200 and small.content_type == "image/webp"
        data = await small.read()
        assert close_to(colour_of(data), colour) and max(sides(data)) == 32
        body = await (await client.get(f"/v1/profiles/{user}")).json()
        assert body["variants"]["small"]["size"] == len(data)
    # The version that is no longer live is left as it was published.
    await assert_problem(await client.get("/v1/profiles/ana/versions/1/image?variant=small"), 404)
    assert {i.state for i in await adding(pool)} == {IntentState.DONE}
    assert await pool.fetchval("SELECT live_version FROM profiles WHERE user_id = 'ana'") == 2


async def test_the_walk_rests_after_a_pass_that_found_nothing_to_change(settings: Settings, pool: Pool) -> None:
    walk = VariantWalk(settings, pool)
    assert await walk.round() == 0
    row = await pool.fetchrow("SELECT passes, rests_until > now() AS resting FROM variant_walks")
    assert row is not None and row["passes"] == 1 and row["resting"]


async def test_a_variant_removed_from_the_configuration_is_removed_from_live_versions_and_its_blob_collected(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    before = configured(settings, *THUMB_AND_SMALL)
    await publish(await make_client(before), before, {"cat": (10, 120, 240)})
    small_key = (await variant_rows(pool, "cat", 1))["small"]["blob_key"]
    await blobs.head(small_key)

    after = configured(settings, *THUMB)
    assert await VariantWalk(after, pool).round() == 1
    assert set(await variant_rows(pool, "cat", 1)) == {"thumb"}
    assert await deletion_reason(pool, small_key) == "unconfigured"
    assert await adding(pool) == []  # nothing to make
    await let_grace_pass(pool, after.gc_grace_seconds)
    await Collector(after, pool, blobs).collect_due()
    with pytest.raises(BlobNotFound):
        await blobs.head(small_key)
    thumb = await (await make_client(after)).get("/v1/profiles/cat/image?variant=thumb")
    assert thumb.status == 200 and close_to(colour_of(await thumb.read()), (10, 120, 240))


async def test_a_variant_configured_at_another_size_is_remade_under_a_fresh_key_and_the_old_one_collected(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, VariantSpec("thumb", 64))
    await publish(await make_client(before), before, {"dan": (240, 240, 10)})
    old_key = (await variant_rows(pool, "dan", 1))["thumb"]["blob_key"]

    after = configured(settings, VariantSpec("thumb", 16))
    client = await make_client(after)
    assert await VariantWalk(after, pool).round() == 1
    row = (await variant_rows(pool, "dan", 1))["thumb"]
    assert row["box"] == 16 and row["blob_key"] != old_key and not row["verified"]
    assert await deletion_reason(pool, old_key) == "unconfigured"
    await assert_problem(await client.get("/v1/profiles/dan/image?variant=thumb"), 404)
    await publish_due(after)
    thumb = await client.get("/v1/profiles/dan/image?variant=thumb")
    assert thumb.status == 200 and max(sides(await thumb.read())) == 16


async def test_the_walk_keeps_at_most_its_bound_in_flight_and_resumes_where_it_stopped_in_another_worker(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings)
    users = [f"u{n}" for n in range(5)]
    await publish(await make_client(before), before, {user: (n * 40, 0, 0) for n, user in enumerate(users)})
    after = configured(settings, *THUMB, variant_backfill_in_flight=2)

    assert await VariantWalk(after, pool).round() == 2
    assert await VariantWalk(after, pool).round() == 0  # two in flight: no room
    assert (await repository.queue_stats(pool, 60)).adding_variants == 2
    await publish_due(after)
    # Another worker's walk carries on after the last profile the first one dealt with.
    assert await VariantWalk(after, pool).round() == 2
    assert [i.user_id for i in await adding(pool)] == users[:4]
    await publish_due(after)
    assert await VariantWalk(after, pool).round() == 1
    await publish_due(after)
    # That pass found versions to change, so another one follows at once, finds none, and rests.
    assert await VariantWalk(after, pool).round() == 0
    row = await pool.fetchrow("SELECT passes, rests_until > now() AS resting FROM variant_walks")
    assert row is not None and row["passes"] == 2 and row["resting"]
    verified = await pool.fetchval("SELECT count(*) FROM version_variants WHERE verified AND name = 'thumb'")
    assert verified == len(users)


async def test_an_add_variants_intent_whose_version_is_replaced_before_it_attaches_attaches_nothing(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"eve": (90, 10, 10)})
    after = configured(settings, *THUMB_AND_SMALL)
    assert await VariantWalk(after, pool).round() == 1
    stale = await claim_one(pool)
    assert stale.purpose is IntentPurpose.ADD_VARIANTS and stale.live_version == stale.version == 1

    client = await make_client(after)
    await publish(client, after, {"eve": (10, 90, 10)})  # v2 goes live meanwhile
    await Worker(after, pool, blobs).process(stale)

    assert (await finished_intent(after.database_url, str(stale.id)))["state"] == "superseded"
    small_v1 = (await variant_rows(pool, "eve", 1))["small"]
    assert not small_v1["verified"]
    # Replacing v2's predecessor retired every blob it names, the one this intent uploaded included.
    assert await deletion_reason(pool, small_v1["blob_key"]) == "replaced"
    small = await client.get("/v1/profiles/eve/image?variant=small")
    assert small.status == 200 and close_to(colour_of(await small.read()), (10, 90, 10))


async def test_an_attach_by_a_worker_that_lost_its_lease_changes_nothing(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"fay": (50, 50, 50)})
    after = configured(settings, *THUMB_AND_SMALL)
    await VariantWalk(after, pool).round()
    first = await claim_one(pool)
    await pool.execute("UPDATE intents SET next_attempt_at = now() WHERE id = $1", first.id)
    second = await claim_one(pool)  # the lease expired and another worker took the intent over
    assert second.id == first.id and second.lease_token != first.lease_token

    await Worker(after, pool, blobs).process(first)
    assert not (await variant_rows(pool, "fay", 1))["small"]["verified"]
    await Worker(after, pool, blobs).process(second)
    assert (await variant_rows(pool, "fay", 1))["small"]["verified"]


async def test_a_dead_add_variants_intent_leaves_its_version_live_and_a_replay_makes_it_under_fresh_keys(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"gus": (0, 160, 160)})
    after = configured(settings, *THUMB_AND_SMALL)
    await VariantWalk(after, pool).round()
    claim = await claim_one(pool)
    assert await repository.fail_attempt(pool, claim, 0.0, "the test gives up", final=True) is IntentState.DEAD

    client = await make_client(after)
    assert (await client.get("/v1/profiles/gus/image")).status == 200
    assert await pool.fetchval("SELECT state FROM versions WHERE user_id = 'gus' AND version = 1") == "published"
    await assert_problem(await client.get("/v1/profiles/gus/image?variant=small"), 404)
    assert await VariantWalk(after, pool).round() == 0  # its variant has a row: the walk leaves it to a replay

    old_key = (await variant_rows(pool, "gus", 1))["small"]["blob_key"]
    assert await operations.replay(pool, after, claim.id) is operations.ReplayOutcome.REPLAYED
    assert (await variant_rows(pool, "gus", 1))["small"]["blob_key"] != old_key
    assert await deletion_reason(pool, old_key) == "failed"
    await publish_due(after)
    small = await client.get("/v1/profiles/gus/image?variant=small")
    assert small.status == 200 and close_to(colour_of(await small.read()), (0, 160, 160))


async def test_an_add_variants_intent_whose_final_attempt_lost_its_lease_dies_without_failing_its_version(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"hal": (1, 2, 3)})
    after = configured(settings, *THUMB_AND_SMALL, max_attempts=1)
    await VariantWalk(after, pool).round()
    claim = await claim_one(pool)
    await pool.execute("UPDATE intents SET next_attempt_at = now() WHERE id = $1", claim.id)
    assert await repository.claim_intents(pool, 10, "test-worker", 10.0) == []

    assert (await repository.get_intent(pool, claim.id)).state is IntentState.DEAD  # type: ignore[union-attr]
    assert await pool.fetchval("SELECT state FROM versions WHERE user_id = 'hal' AND version = 1") == "published"
    assert await pool.fetchval("SELECT live_version FROM profiles WHERE user_id = 'hal'") == 1


async def test_a_worker_still_on_an_older_configuration_leaves_the_walk_to_the_newest(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    newer = configured(settings, *THUMB_AND_SMALL)
    await publish(await make_client(newer), newer, {"ivy": (77, 0, 77)})
    older = VariantWalk(configured(settings, *THUMB), pool)
    assert await older.round() == 1  # alone, it walks to its own configuration
    assert set(await variant_rows(pool, "ivy", 1)) == {"thumb"}

    await publish(await make_client(newer), newer, {"ivy": (0, 77, 77)})
    assert await VariantWalk(newer, pool).round() == 0  # started after: the newest, and v2 has both
    assert await older.round() == 0  # no longer the newest: it must not remove `small` again
    assert set(await variant_rows(pool, "ivy", 2)) == {"thumb", "small"}


async def test_workers_walk_on_their_own_and_a_listed_add_variants_intent_says_its_purpose(
    make_client: MakeClient, settings: Settings, start_worker: StartWorker, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"joy": (200, 100, 0)})
    after = configured(settings, *THUMB_AND_SMALL, gc_interval_seconds=0.2)
    await start_worker(after)

    async def made() -> list[repository.ListedIntent] | None:
        found = await adding(pool)
        return found if found and found[0].state is IntentState.DONE else None

    (intent,) = await until_intents_finish(after.database_url, made, what="joy's small variant")
    shown = await operations.show_intent(pool, intent.id)
    assert shown is not None and shown.purpose is IntentPurpose.ADD_VARIANTS and shown.version == 1
    small = await (await make_client(after)).get("/v1/profiles/joy/image?variant=small")
    assert small.status == 200 and close_to(colour_of(await small.read()), (200, 100, 0))


async def test_the_console_shows_each_versions_variants_and_the_intent_making_the_new_ones(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"kim": (12, 34, 56)})
    after = configured(settings, *THUMB_AND_SMALL)
    console = await make_client(after)
    await VariantWalk(after, pool).round()
    (intent,) = await adding(pool)
    page = await (await console.get("/admin/profiles/kim")).text()
    assert 'data-variant="thumb" data-made="yes"' in page and 'data-variant="small" data-made="no"' in page
    assert f'href="/admin/intents/{intent.id}"' in page
    await publish_due(after)
    page = await (await console.get("/admin/profiles/kim")).text()
    assert 'data-variant="small" data-made="yes"' in page
    detail = await (await console.get(f"/admin/intents/{intent.id}")).text()
    assert "Made from" in detail and "Staged bytes" not in detail
    # One write was published in the last hour; adding its variant published nothing.
    overview = await operations.overview(pool, after.gc_grace_seconds)
    assert sum(minute.done for minute in overview.per_minute) == 1


# --- attacks: a replay racing the walk, pruning, a rollback -----------------------------------------

WITH_MEDIUM = (*THUMB_AND_SMALL, VariantSpec("medium", 48))
COLOUR = (140, 20, 200)


async def dead_add_variants_intent(make_client: MakeClient, settings: Settings, pool: Pool, user: str) -> Claim:
    """`user`'s v1, published with a thumb, walked to thumb and small by an intent that died."""
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {user: COLOUR})
    assert await VariantWalk(configured(settings, *THUMB_AND_SMALL), pool).round() == 1
    claim = await claim_one(pool)
    assert await repository.fail_attempt(pool, claim, 0.0, "the test gives up", final=True) is IntentState.DEAD
    return claim


async def blocked_sessions(pool: Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return count


async def settled(pool: Pool, task: asyncio.Task[Any], blocked: int) -> None:
    """Until `task` has finished or `blocked` sessions wait for a lock (whichever its code does)."""

    async def either() -> bool:
        return task.done() or await blocked_sessions(pool) >= blocked

    await eventually(either, what="the task to finish or to wait for a lock")


async def unfinished_add_variants(pool: Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM intents WHERE purpose = 'add_variants' AND state IN ('pending', 'in_progress')"
    )
    return count


async def all_variants_served(client: Client, user: str, variants: tuple[VariantSpec, ...]) -> None:
    for spec in variants:
        response = await client.get(f"/v1/profiles/{user}/image?variant={spec.name}")
        assert response.status == 200, f"{spec.name}: {await response.text()}"
        data = await response.read()
        assert close_to(colour_of(data), COLOUR) and max(sides(data)) == spec.box


async def test_the_walk_queuing_a_version_again_makes_what_its_dead_intent_did_not_so_a_refused_replay_loses_nothing(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    dead = await dead_add_variants_intent(make_client, settings, pool, "mia")
    (old,) = dead.variants
    third = configured(settings, *WITH_MEDIUM)
    assert await VariantWalk(third, pool).round() == 1  # `medium` is missing
    (queued,) = [i for i in await adding(pool) if i.state is IntentState.PENDING]
    assert await operations.replay(pool, third, dead.id) is operations.ReplayOutcome.ALREADY_PENDING
    assert await deletion_reason(pool, old.blob_key) == "failed"
    assert await publish_due(third) == 1
    assert (await finished_intent(third.database_url, str(queued.id)))["state"] == "done"
    await all_variants_served(await make_client(third), "mia", WITH_MEDIUM)


async def test_a_replay_that_read_the_intents_before_the_walk_queued_the_version_again_never_raises(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    dead = await dead_add_variants_intent(make_client, settings, pool, "kim")
    third = configured(settings, *WITH_MEDIUM)
    async with pool.acquire() as holder:
        async with holder.transaction():
            # Someone holds the dead intent's row: the replay waits for it with its snapshot taken.
            await holder.execute("SELECT 1 FROM intents WHERE id = $1 FOR UPDATE", dead.id)
            replaying = asyncio.create_task(operations.replay(pool, third, dead.id))
            await until_blocked(pool, what="the replay to wait for the intent", statement="overtaken")
            # Meanwhile the walk finds v1 without `medium` and queues an intent for it.
            walking = asyncio.create_task(VariantWalk(third, pool).round())
            await settled(pool, walking, blocked=2)
        outcome, _ = await asyncio.gather(replaying, walking)
    assert outcome in (operations.ReplayOutcome.REPLAYED, operations.ReplayOutcome.ALREADY_PENDING)
    assert await unfinished_add_variants(pool) == 1
    await publish_due(third)
    await VariantWalk(third, pool).round()  # whatever the first intent did not make
    await publish_due(third)
    await all_variants_served(await make_client(third), "kim", WITH_MEDIUM)


async def test_a_walk_that_read_the_intents_before_a_replay_committed_never_raises(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    dead = await dead_add_variants_intent(make_client, settings, pool, "lin")
    third = configured(settings, *WITH_MEDIUM)
    async with pool.acquire() as holder:
        async with holder.transaction():
            # A writer of the user holds the profile: the walk's refresh waits for it.
            await holder.execute("SELECT 1 FROM profiles WHERE user_id = 'lin' FOR UPDATE")
            walking = asyncio.create_task(VariantWalk(third, pool).round())
            await settled(pool, walking, blocked=1)
            assert not walking.done()
            # Meanwhile an operator replays the dead intent.
            replaying = asyncio.create_task(operations.replay(pool, third, dead.id))
            await settled(pool, replaying, blocked=2)
        outcome, _ = await asyncio.gather(replaying, walking)
    assert outcome in (operations.ReplayOutcome.REPLAYED, operations.ReplayOutcome.ALREADY_PENDING)
    assert await unfinished_add_variants(pool) == 1
    await publish_due(third)
    await VariantWalk(third, pool).round()
    await publish_due(third)
    await all_variants_served(await make_client(third), "lin", WITH_MEDIUM)


async def test_a_dead_add_variants_intent_once_pruned_is_made_again_by_the_walk_and_its_upload_collected(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    dead = await dead_add_variants_intent(make_client, settings, pool, "max")
    after = configured(settings, *THUMB_AND_SMALL)
    (upload,) = dead.variants
    await blobs.put_once(
        upload.blob_key,
        b"what the dead attempt uploaded",
        hashlib.sha256(b"what the dead attempt uploaded").hexdigest(),
        "image/webp",
    )
    await pool.execute("UPDATE intents SET updated_at = now() - interval '8 days' WHERE id = $1", dead.id)
    assert (await prune(after, pool))["dead_intents"] == 1

    await pool.execute("UPDATE variant_walks SET rests_until = NULL")  # the next pass, at once
    assert await VariantWalk(after, pool).round() == 1
    assert await deletion_reason(pool, upload.blob_key) == "failed"
    await publish_due(after)
    await all_variants_served(await make_client(after), "max", THUMB_AND_SMALL)
    await let_grace_pass(pool, after.gc_grace_seconds)
    await Collector(after, pool, blobs).collect_due()
    with pytest.raises(BlobNotFound):
        await blobs.head(upload.blob_key)


async def test_a_configuration_announced_again_after_another_one_is_walked_to_at_once(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    first = configured(settings, *THUMB)
    await publish(await make_client(first), first, {"ned": COLOUR})
    assert await VariantWalk(first, pool).round() == 0  # nothing to change: it rests
    second = configured(settings, *THUMB_AND_SMALL)
    assert await VariantWalk(second, pool).round() == 1
    await publish_due(second)
    # A rollback: a worker starts with the first configuration again.
    assert await VariantWalk(first, pool).round() == 1
    assert set(await variant_rows(pool, "ned", 1)) == {"thumb"}


async def test_an_attach_waiting_for_a_delete_of_its_profile_attaches_nothing_and_its_upload_is_collected(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"oz": COLOUR})
    after = configured(settings, *THUMB_AND_SMALL)
    assert await VariantWalk(after, pool).round() == 1
    claim = await claim_one(pool)
    (small,) = claim.variants
    async with pool.acquire() as deleter:
        async with deleter.transaction():
            await repository.lock_existing_profile(deleter, "oz")
            await repository.accept_delete(deleter, "oz")
            attaching = asyncio.create_task(Worker(after, pool, blobs).process(claim))
            await until_blocked(pool, what="the attach to wait for the delete", statement="Finishes add_variants")
        await attaching
    assert (await finished_intent(after.database_url, str(claim.id)))["state"] == "superseded"
    assert not (await variant_rows(pool, "oz", 1))["small"]["verified"]
    assert await deletion_reason(pool, small.blob_key) == "deleted"
    await blobs.head(small.blob_key)  # uploaded before the attach waited
    await let_grace_pass(pool, after.gc_grace_seconds)
    await Collector(after, pool, blobs).collect_due()
    with pytest.raises(BlobNotFound):
        await blobs.head(small.blob_key)


async def test_an_add_variants_intent_taken_over_after_its_uploads_attaches_the_same_bytes(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    before = configured(settings, *THUMB)
    await publish(await make_client(before), before, {"pam": COLOUR})
    after = configured(settings, *WITH_MEDIUM)
    assert await VariantWalk(after, pool).round() == 1
    first = await claim_one(pool)
    # The first worker uploads every variant and dies before attaching.
    original = await blobs.read(first.blob_key)
    wanted = [(upload.spec, upload.format) for upload in first.variants]
    await upload_all(blobs, first, tuple(render_variants(original, wanted)))
    await pool.execute("UPDATE intents SET next_attempt_at = now() WHERE id = $1", first.id)
    second = await claim_one(pool)
    await Worker(after, pool, blobs).process(second)
    assert (await finished_intent(after.database_url, str(second.id)))["state"] == "done"
    await all_variants_served(await make_client(after), "pam", WITH_MEDIUM)
    for row in (await variant_rows(pool, "pam", 1)).values():
        assert row["verified"] and (await blobs.head(row["blob_key"])) is not None


async def test_a_worker_whose_round_finds_the_walk_held_by_another_queues_nothing(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    after = configured(settings, *THUMB)
    walk = VariantWalk(after, pool)
    assert await walk.round() == 0  # announced, with nothing to walk yet
    before = configured(settings)
    users = {f"w{n}": (n * 50, 10, 10) for n in range(4)}
    await publish(await make_client(before), before, users)
    await pool.execute("UPDATE variant_walks SET rests_until = NULL")
    async with pool.acquire() as other, other.transaction():
        assert await repository.lock_variant_walk(other, after.variant_configuration) is not None
        assert await walk.round() == 0
        assert await adding(pool) == []
    assert await walk.round() == len(users)
    assert sorted(i.user_id for i in await adding(pool)) == sorted(users)


async def test_a_delete_between_the_walk_finding_a_version_and_refreshing_it_leaves_the_tombstone_alone(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    before = configured(settings, *THUMB)
    client = await make_client(before)
    await publish(client, before, {"roy": COLOUR})
    configured_now = [{"name": "small", "box": 32, "content_type": "image/webp"}]
    (work,) = await repository.find_variant_work(pool, None, None, configured_now, 10)
    assert (await client.delete("/v1/profiles/roy")).status == 204
    planned = [{**configured_now[0], "blob_key": "never-used"}]
    assert not (await repository.refresh_variants(pool, work, planned, 3)).refreshed
    assert set(await variant_rows(pool, "roy", 1)) == {"thumb"}
    assert await adding(pool) == []
    await assert_problem(await client.get("/v1/profiles/roy"), 404)


async def test_one_users_intents_are_listed_through_an_index_as_before_intents_had_a_purpose(pool: Pool) -> None:
    await pool.execute(
        """
        INSERT INTO profiles (user_id, newest_version) SELECT 'p' || n, 1 FROM generate_series(1, 20000) n;
        INSERT INTO versions (user_id, version, kind, state, metadata, blob_key, sha256, size, content_type, width,
                              height)
        SELECT 'p' || n, 1, 'put', 'published', '{}', 'k' || n, 'x', 1, 'image/png', 1, 1
        FROM generate_series(1, 20000) n;
        INSERT INTO intents (user_id, version, max_attempts, blob_key, state)
        SELECT 'p' || n, 1, 3, 'k' || n, 'done' FROM generate_series(1, 20000) n;
        ANALYZE intents;
        """
    )
    plan = await pool.fetchval(
        "EXPLAIN (FORMAT JSON) " + query("list_intents"), None, "p123", None, None, None, 50, None
    )
    assert "Seq Scan" not in plan, plan


async def test_a_replay_of_a_dead_add_variants_intent_after_the_walk_remade_its_variants_changes_nothing(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    dead = await dead_add_variants_intent(make_client, settings, pool, "sal")
    resized = (VariantSpec("thumb", 64), VariantSpec("small", 24))
    after = configured(settings, *resized)
    assert await VariantWalk(after, pool).round() == 1
    assert await publish_due(after) == 1
    live_small = (await variant_rows(pool, "sal", 1))["small"]
    assert live_small["verified"] and live_small["box"] == 24

    assert await operations.replay(pool, after, dead.id) is operations.ReplayOutcome.REPLAYED
    assert await publish_due(after) == 1
    assert (await finished_intent(after.database_url, str(dead.id)))["state"] == "done"
    assert (await variant_rows(pool, "sal", 1))["small"]["blob_key"] == live_small["blob_key"]
    assert await deletion_reason(pool, live_small["blob_key"]) is None
    await all_variants_served(await make_client(after), "sal", resized)

"""Garbage collection, reconciliation, replay and pruning against real PostgreSQL and S3.

The grace period is real: collection before it ends deletes nothing. To let it pass without
waiting, tests move the schedule back in time (`let_grace_pass`), which is what the database clock
would show after waiting.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from service.core import operations, repository
from service.core.blobstore import BlobStore, open_blob_store
from service.core.domain import new_blob_key
from service.core.operations import ReplayOutcome
from service.core.repository import IntentFilter, Pool
from service.core.settings import Settings
from tests.support import (
    Client,
    MakeClient,
    StartWorker,
    accepted,
    blob_key,
    intent_row,
    let_grace_pass,
    live_keys,
    live_version,
    made,
    png,
    publish_due,
    until_blocked,
    version_keys,
    wait_live,
)
from workers.maintenance import Collector, prune, reconcile
from workers.outbox import Worker


async def collect(settings: Settings, pool: Pool, blobs: BlobStore) -> int:
    return (await Collector(settings, pool, blobs).collect_due()).deleted


async def bucket(blobs: BlobStore, settings: Settings) -> set[str]:
    return set(await blobs.list_keys(settings.s3_key_prefix))


async def test_after_an_update_and_the_grace_period_the_bucket_holds_exactly_the_live_blobs(
    client: Client, start_worker: StartWorker, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    await start_worker()
    for version, image in enumerate((png(1), png(2), png(3)), start=1):
        await accepted(client, "amy", {"display_name": f"v{version}"}, image)
        await wait_live(client, "amy", version)
    old = await version_keys(settings.database_url, "amy", 1) | await version_keys(settings.database_url, "amy", 2)
    assert len(old) == 2 * (1 + len(settings.variants))
    assert await collect(settings, pool, blobs) == 0
    assert old < await bucket(blobs, settings)

    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == len(old)
    assert await bucket(blobs, settings) == await live_keys(pool) == await version_keys(settings.database_url, "amy", 3)
    assert await blobs.read(await blob_key(settings.database_url, "amy", 3)) == png(3)


async def test_a_reader_holding_the_old_pointer_gets_the_old_bytes_within_the_grace_period(
    client: Client, start_worker: StartWorker, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    await start_worker()
    await accepted(client, "bo", {"display_name": "old"}, png(4))
    await wait_live(client, "bo", 1)
    old_url = (await (await client.get("/v1/profiles/bo")).json())["image"]["url"]
    await accepted(client, "bo", {"display_name": "new"}, png(5))
    await wait_live(client, "bo", 2)
    await collect(settings, pool, blobs)

    response = await client.get(old_url)
    assert response.status == 200 and await response.read() == png(4)
    await let_grace_pass(pool, settings.gc_grace_seconds)
    await collect(settings, pool, blobs)
    assert (await client.get(old_url)).status == 404


async def test_a_dead_intent_after_a_partial_upload_is_collected_and_a_replay_publishes_it_under_a_fresh_key(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    client = await make_client(settings.model_copy(update={"max_attempts": 1}))
    body = await accepted(client, "cy", {"display_name": "Cy"}, png(6))
    first_key = await blob_key(settings.database_url, "cy", 1)
    first_keys = await version_keys(settings.database_url, "cy", 1)
    (claim,) = await repository.claim_intents(pool, 1, "test", 30)
    hasty = Worker(settings.model_copy(update={"attempt_timeout_seconds": 1.0}), pool, blobs)
    async with pool.acquire() as blocker, blocker.transaction():
        # The upload succeeds; the publishing transaction then waits past the attempt deadline.
        await blocker.execute("SELECT 1 FROM profiles WHERE user_id = 'cy' FOR UPDATE")
        await hasty.process(claim)
    dead = await intent_row(settings.database_url, body["intent_id"])
    assert dead["state"] == "dead" and "TimeoutError" in dead["last_error"]
    assert await blobs.read(first_key) == png(6)

    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == len(first_keys)
    assert not first_keys & await bucket(blobs, settings)

    assert await operations.replay(pool, settings, claim.id) is ReplayOutcome.REPLAYED
    assert await operations.replay(pool, settings, claim.id) is ReplayOutcome.ALREADY_PENDING
    fresh_key = await blob_key(settings.database_url, "cy", 1)
    assert not await version_keys(settings.database_url, "cy", 1) & first_keys
    assert await publish_due(settings) == 1
    assert await live_version(client, "cy") == 1
    assert (await client.get("/v1/profiles/cy/image")).status == 200
    assert await blobs.read(fresh_key) == png(6)
    assert await operations.replay(pool, settings, claim.id) is ReplayOutcome.FINISHED
    replayed = await intent_row(settings.database_url, body["intent_id"])
    assert (replayed["state"], replayed["replays"], replayed["attempts"]) == ("done", 1, 1)


async def test_a_replay_of_an_intent_whose_lease_is_held_is_refused(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await accepted(client, "di", {"display_name": "Di"}, png(7))
    (claim,) = await repository.claim_intents(pool, 1, "test", 30)
    assert await operations.replay(pool, settings, claim.id) is ReplayOutcome.LEASED
    assert (await intent_row(settings.database_url, str(claim.id)))["lease_token"] == claim.lease_token


async def test_delete_collects_every_version_blob_after_the_grace_period_and_nothing_before(
    client: Client, start_worker: StartWorker, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    await start_worker()
    for version in (1, 2):
        await accepted(client, "ed", {"display_name": f"v{version}"}, png(10 + version))
        await wait_live(client, "ed", version)
    keys = await version_keys(settings.database_url, "ed", 1) | await version_keys(settings.database_url, "ed", 2)
    assert (await client.delete("/v1/profiles/ed")).status == 204
    assert await collect(settings, pool, blobs) == 0
    assert await bucket(blobs, settings) == keys

    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == len(keys)
    assert await bucket(blobs, settings) == set()


async def upload_to(blobs: BlobStore, key: str, data: bytes) -> None:
    await blobs.put_once(key, data, hashlib.sha256(data).hexdigest(), "image/png")


async def test_reconciliation_collects_stray_and_reappeared_keys_but_never_a_pending_one(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    stray = new_blob_key(settings.s3_key_prefix)
    await upload_to(blobs, stray, b"stray bytes")
    await accepted(client, "flo", {"display_name": "v1"}, png(20))
    await accepted(client, "flo", {"display_name": "v2"}, png(21))
    assert await publish_due(settings) == 2
    replaced = await blob_key(settings.database_url, "flo", 1)
    live = await version_keys(settings.database_url, "flo", 2)
    await accepted(client, "flo", {"display_name": "v3"}, png(22))
    pending = await blob_key(settings.database_url, "flo", 3)
    await upload_to(blobs, pending, png(22))  # a worker's upload, not yet published
    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == len(await version_keys(settings.database_url, "flo", 1))
    await upload_to(blobs, replaced, png(20))  # a stale worker's upload landing after collection

    needed = 1 + len(live)
    dry = await reconcile(settings, pool, blobs, dry_run=True)
    assert dry.scheduled == {"stray": 1, "reappeared": 1} and dry.needed == needed
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions WHERE state = 'scheduled'") == 0
    report = await reconcile(settings, pool, blobs)
    assert report.scheduled == {"stray": 1, "reappeared": 1} and report.needed == needed
    assert report.listed == needed + 2
    assert report.foreign == 0
    assert await collect(settings, pool, blobs) == 0
    assert {stray, replaced} <= await bucket(blobs, settings)

    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == 2
    assert await bucket(blobs, settings) == {pending} | live


async def test_reconciliation_leaves_alone_every_key_this_deployment_did_not_make(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    # A deployment sharing the bucket under a prefix that starts with ours, and a hand-made key.
    neighbour = new_blob_key(f"{settings.s3_key_prefix}eu/")
    by_hand = f"{settings.s3_key_prefix}README.txt"
    for key in (neighbour, by_hand):
        await upload_to(blobs, key, b"not ours")
    report = await reconcile(settings, pool, blobs)
    assert (report.listed, report.foreign, sum(report.scheduled.values())) == (2, 2, 0)
    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == 0
    assert {neighbour, by_hand} <= await bucket(blobs, settings)


async def test_a_deletions_grace_period_starts_when_a_collector_first_sees_it(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    await accepted(client, "uma", {"display_name": "v1"}, png(24))
    await accepted(client, "uma", {"display_name": "v2"}, png(25))
    assert await publish_due(settings) == 2
    # Scheduled long ago by the clock of its (slow to commit) transaction, but never seen yet.
    await pool.execute("UPDATE blob_deletions SET scheduled_at = scheduled_at - interval '1 day'")
    replaced = len(await version_keys(settings.database_url, "uma", 1))
    assert await collect(settings, pool, blobs) == 0
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions WHERE seen_at IS NOT NULL") == replaced
    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert await collect(settings, pool, blobs) == replaced


async def test_two_collectors_at_once_delete_each_blob_once_and_never_a_live_one(
    client: Client, settings: Settings, pool: Pool
) -> None:
    for round_ in range(4):
        for user in ("gil", "hal", "ian"):
            await accepted(client, user, {"display_name": f"{user}-{round_}"}, png(100 + round_ * 3 + len(user)))
        assert await publish_due(settings) == 3
    await let_grace_pass(pool, settings.gc_grace_seconds)

    async def one_collector() -> int:
        own = await repository.create_pool(settings.database_url, min_size=1, max_size=2, timeout=5)
        try:
            async with open_blob_store(settings) as blobs:
                return await collect(settings.model_copy(update={"gc_batch_size": 2}), own, blobs)
        finally:
            await own.close()

    deleted = await asyncio.gather(one_collector(), one_collector())
    replaced = 9 * (1 + len(settings.variants))
    assert sum(deleted) == replaced
    states = await pool.fetch("SELECT state, count(*) AS n FROM blob_deletions GROUP BY state")
    assert {row["state"]: row["n"] for row in states} == {"deleted": replaced}
    async with open_blob_store(settings) as blobs:
        assert await bucket(blobs, settings) == await live_keys(pool)


async def test_pruning_removes_only_rows_past_their_retention_and_keeps_dead_bytes_for_replay(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    await accepted(client, "jo", {"display_name": "v1"}, png(30), {"Idempotency-Key": "k1"})
    await accepted(client, "jo", {"display_name": "v2"}, png(31))
    assert await publish_due(settings) == 2
    await pool.execute("UPDATE intents SET state = 'dead', last_error = 'test' WHERE version = 2")
    await pool.execute("UPDATE intents SET updated_at = now() - interval '8 days' WHERE version = 1")
    pruned = await prune(settings, pool)
    assert pruned == {
        "finished_intents": 1,
        "dead_intents": 0,
        "idempotency_keys": 0,
        "blob_deletions": 0,
        "replay_jobs": 0,
        "console_sessions": 0,
    }
    assert await pool.fetchval("SELECT count(*) FROM intents") == 1
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys") == 1

    await pool.execute("UPDATE intents SET updated_at = now() - interval '8 days'")
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    pruned = await prune(settings, pool)
    assert pruned["dead_intents"] == 1 and pruned["idempotency_keys"] == 1
    assert await pool.fetchval("SELECT count(*) FROM intents") == 0
    assert await pool.fetchval("SELECT count(*) FROM staged_images") == 0
    assert await live_version(client, "jo") == 2


async def test_many_replays_by_filter_report_each_outcome(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    client = await make_client(settings.model_copy(update={"max_attempts": 1}))
    for user in ("kai", "kai", "lee"):
        await accepted(client, user, {"display_name": user}, png(40 + len(user)))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE intents SET attempts = 1, state = 'dead', last_error = 'S3 outage'")
    where = IntentFilter(state="dead", user_id="kai")
    ids = await operations.replayable_ids(pool, where)
    assert len(ids) == 2
    dry = await operations.replay_all(pool, settings, ids, dry_run=True)
    assert dry == {ReplayOutcome.WOULD_REPLAY: 2}
    seen: list[ReplayOutcome] = []
    done = await operations.replay_all(pool, settings, ids, progress=lambda _id, outcome: seen.append(outcome))
    assert done == {ReplayOutcome.REPLAYED: 2} and seen == [ReplayOutcome.REPLAYED] * 2
    assert await operations.replayable_ids(pool, where) == []
    assert len(await operations.replayable_ids(pool, IntentFilter(state="dead"))) == 1
    with pytest.raises(ValueError, match="dead or stuck"):
        await operations.replayable_ids(pool, IntentFilter(state="done"))


async def test_deletions_are_scheduled_in_the_same_transaction_as_the_change_that_frees_the_blob(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await accepted(client, "mo", {"display_name": "v1"}, png(50))
    await accepted(client, "mo", {"display_name": "v2"}, png(51))
    claims = {c.version: c for c in await repository.claim_intents(pool, 10, "test", 30)}
    async with open_blob_store(settings) as blobs:
        worker = Worker(settings, pool, blobs)
        await worker.process(claims[2])
        await worker.process(claims[1])
    await accepted(client, "mo", {"display_name": "v3"}, png(52))
    assert await publish_due(settings) == 1
    assert (await client.delete("/v1/profiles/mo")).status == 204
    rows = await pool.fetch("SELECT version, reason, count(*) AS n FROM blob_deletions GROUP BY 1, 2 ORDER BY 1")
    each = 1 + len(settings.variants)  # a version's image and its variants go together
    assert [tuple(row) for row in rows] == [(1, "superseded", each), (2, "replaced", each), (3, "deleted", each)]


async def test_a_replayed_intent_can_no_longer_be_completed_by_its_old_lease(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await accepted(client, "ned", {"display_name": "Ned"}, png(60))
    (stale,) = await repository.claim_intents(pool, 1, "test", 30)
    await pool.execute("UPDATE intents SET next_attempt_at = now() - interval '1 second'")
    assert (await repository.list_intents(pool, IntentFilter(state="stuck"), 10))[0].id == stale.id
    assert await operations.replay(pool, settings, stale.id) is ReplayOutcome.REPLAYED
    async with pool.acquire() as conn:
        assert await repository.publish_intent(conn, made(stale)) is None
    assert (await intent_row(settings.database_url, str(stale.id)))["state"] == "pending"


async def test_pruning_keeps_a_dead_intent_that_a_replay_revives_while_the_prune_waits(
    client: Client, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "pia", {"display_name": "Pia"}, png(70))
    await pool.execute("UPDATE intents SET state = 'dead', updated_at = now() - interval '8 days'")
    async with pool.acquire() as replayer:
        revive = replayer.transaction()
        await revive.start()
        await replayer.execute("UPDATE intents SET state = 'pending', updated_at = now()")  # as replay does
        pruning = asyncio.create_task(prune(settings, pool))
        await until_blocked(pool, what="the prune to wait for the replay's row lock", statement="DELETE FROM intents")
        await revive.commit()
        pruned = await pruning
    assert pruned["dead_intents"] == 0
    row = await intent_row(settings.database_url, body["intent_id"])
    assert row["state"] == "pending"
    assert await pool.fetchval("SELECT count(*) FROM staged_images") == 1

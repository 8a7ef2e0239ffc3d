"""Interleavings of the protocol's real statements, reproduced step by step with connections that
hold locks: each step waits until PostgreSQL shows the previous one blocked, never on a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from service.core import operations, repository
from service.core.blobstore import BlobStore
from service.core.domain import IntentState, new_blob_key
from service.core.operations import ReplayOutcome
from service.core.repository import Pool
from service.core.settings import Settings
from tests.support import (
    Client,
    accepted,
    blob_key,
    intent_row,
    let_grace_pass,
    made,
    png,
    until_blocked,
    version_keys,
)
from workers.maintenance import Collector
from workers.outbox import Worker
from workers.variants import upload_all

GATE = 4242

# Test-only: a statement run by a session that SET profiles_test.hold = 'on' stops at its first
# UPDATE of intents (claim and publish both start with one), after taking its snapshot and before
# reading any row, until the GATE advisory lock is free. Every other session passes straight through.
HOLD = f"""
CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('profiles_test.hold', true) = 'on' THEN
        PERFORM pg_advisory_lock({GATE});
        PERFORM pg_advisory_unlock({GATE});
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER hold BEFORE UPDATE ON intents FOR EACH STATEMENT EXECUTE FUNCTION hold();
"""


async def final_attempt_with_expired_lease(client: Client, pool: Pool, user: str, image: bytes) -> str:
    """A write whose worker claimed its final attempt and vanished: the lease is over."""
    body = await accepted(client, user, {"display_name": user}, image)
    (crashed,) = await repository.claim_intents(pool, 1, "crashed", 30)
    await pool.execute(
        "UPDATE intents SET max_attempts = attempts, next_attempt_at = now() - interval '1 second' WHERE id = $1",
        crashed.id,
    )
    return str(body["intent_id"])


async def test_a_claim_racing_a_replay_of_an_intent_dying_at_claim_uploads_to_the_key_it_publishes(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    intent_id = await final_attempt_with_expired_lease(client, pool, "rio", png(81))
    first_key = await blob_key(settings.database_url, "rio", 1)
    await pool.execute(HOLD)
    async with pool.acquire() as gate, pool.acquire() as worker_b, pool.acquire() as worker_a:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        # Worker B's claim locks the intent and kills it (no attempt left); B has not committed.
        dying = worker_b.transaction()
        await dying.start()
        assert await repository.claim_intents(worker_b, 1, "B", settings.lease_seconds) == []
        # The operator's replay waits for B's lock.
        replaying = asyncio.create_task(operations.replay(pool, settings, uuid.UUID(intent_id)))
        await until_blocked(pool, what="replay to wait for B", statement="FOR UPDATE", wait_event="transactionid")
        # Worker A's claim takes its snapshot now (intent in_progress, lease expired) and is held.
        await worker_a.execute("SET profiles_test.hold = 'on'")
        claiming = asyncio.create_task(repository.claim_intents(worker_a, 1, "A", settings.lease_seconds))
        await until_blocked(
            pool, what="A's claim to be held", statement="Takes up to $1 due intents", wait_event="advisory"
        )
        # B commits the death; the replay gives the version a fresh key and commits.
        await dying.commit()
        assert await replaying is ReplayOutcome.REPLAYED
        fresh_key = await blob_key(settings.database_url, "rio", 1)
        assert fresh_key != first_key
        # A's scan reaches the replayed intent and claims it.
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")
        (claim,) = await claiming
    assert claim.blob_key == fresh_key, "the claim must upload to the key its version names now"
    await Worker(settings, pool, blobs).process(claim)
    assert (await intent_row(settings.database_url, intent_id))["state"] == IntentState.DONE
    image = await client.get("/v1/profiles/rio/image")
    assert image.status == 200
    assert await image.read() == png(81)
    assert await blobs.read(fresh_key) == png(81)


async def test_publishing_is_refused_unless_the_version_still_names_the_uploaded_key(
    client: Client, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "sol", {"display_name": "Sol"}, png(82))
    (claim,) = await repository.claim_intents(pool, 1, "test", settings.lease_seconds)
    elsewhere = dataclasses.replace(claim, blob_key=new_blob_key(settings.s3_key_prefix))
    async with pool.acquire() as conn:
        assert await repository.publish_intent(conn, made(elsewhere)) is None
    row = await intent_row(settings.database_url, body["intent_id"])
    assert (row["state"], row["lease_token"]) == ("in_progress", claim.lease_token)
    assert await pool.fetchval("SELECT state FROM versions WHERE user_id = 'sol'") == "pending"
    async with pool.acquire() as conn:
        assert await repository.publish_intent(conn, made(claim)) is IntentState.DONE


async def test_a_publish_racing_a_replayed_older_version_schedules_the_blob_that_stopped_being_live(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    first = await accepted(client, "lea", {"display_name": "v1"}, png(341))
    await accepted(client, "lea", {"display_name": "v2"}, png(342))
    await pool.execute("UPDATE intents SET max_attempts = 1 WHERE version = 1")
    claims = {c.version: c for c in await repository.claim_intents(pool, 2, "test", settings.lease_seconds)}
    # v1's only attempt fails (dead, its key scheduled); v2's worker uploaded and is about to publish.
    assert await repository.fail_attempt(pool, claims[1], 0, "test") is IntentState.DEAD
    dead_keys = await version_keys(settings.database_url, "lea", 1)
    v2 = made(claims[2])
    await upload_all(blobs, claims[2], v2.variants, original=png(342))
    await pool.execute(HOLD)
    async with pool.acquire() as gate, pool.acquire() as publisher:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        await publisher.execute("SET profiles_test.hold = 'on'")
        # The batch statement itself (which never waits for a profile: it skips a locked one).
        publishing = asyncio.create_task(repository.publish_intents(publisher, [v2]))
        await until_blocked(
            pool, what="v2's publish to be held", statement="Fenced: only the holder", wait_event="advisory"
        )
        # Meanwhile v1 is replayed (fresh key), uploaded and published.
        assert await operations.replay(pool, settings, uuid.UUID(first["intent_id"])) is ReplayOutcome.REPLAYED
        (again,) = await repository.claim_intents(pool, 1, "other", settings.lease_seconds)
        await Worker(settings, pool, blobs).process(again)
        fresh_keys = await version_keys(settings.database_url, "lea", 1)
        assert not fresh_keys & dead_keys and len(fresh_keys) == len(dead_keys) == 1 + len(settings.variants)
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")
        assert (await publishing).states == {claims[2].id: IntentState.DONE}
    scheduled = {
        row["blob_key"]: row["reason"] for row in await pool.fetch("SELECT blob_key, reason FROM blob_deletions")
    }
    # The trigger read v1's variant keys as the replay left them, like its image key.
    assert scheduled == dict.fromkeys(dead_keys, "failed") | dict.fromkeys(fresh_keys, "replaced")
    await let_grace_pass(pool, settings.gc_grace_seconds)
    assert (await Collector(settings, pool, blobs).collect_due()).deleted == len(dead_keys) + len(fresh_keys)
    assert set(await blobs.list_keys(settings.s3_key_prefix)) == await version_keys(settings.database_url, "lea", 2)

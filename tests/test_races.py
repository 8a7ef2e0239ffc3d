"""Interleavings of the protocol's real statements, reproduced step by step with connections that
hold locks: each step waits until PostgreSQL shows the previous one blocked, never on a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from service import operations, repository
from service.blobstore import BlobStore
from service.domain import IntentState, new_blob_key
from service.operations import ReplayOutcome
from service.repository import Pool
from service.settings import Settings
from tests.support import eventually, intent_row, png
from tests.test_write_and_read import accepted, blob_key
from workers.outbox import Worker

GATE = 4242

# Test-only: a claim statement run by a session that set profiles_test.hold_claim stops at its
# first UPDATE of intents, after taking its snapshot and before scanning for due rows, until the
# GATE advisory lock is free. Every other statement passes straight through.
HOLD_CLAIM = f"""
CREATE FUNCTION hold_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('profiles_test.hold_claim', true) = 'on' THEN
        PERFORM pg_advisory_lock({GATE});
        PERFORM pg_advisory_unlock({GATE});
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER hold_claim BEFORE UPDATE ON intents FOR EACH STATEMENT EXECUTE FUNCTION hold_claim();
"""


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[Pool]:
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=6, timeout=5)
    yield pool
    await pool.close()


async def waiting(pool: Pool, wait_event: str, statement: str) -> bool:
    """Whether a session is blocked on `wait_event` (a Lock wait: 'transactionid', 'advisory', …)
    in a statement containing `statement`."""
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = $1"
        " AND strpos(query, $2) > 0",
        wait_event,
        statement,
    )
    return bool(count)


async def final_attempt_with_expired_lease(client: TestClient, pool: Pool, user: str, image: bytes) -> str:
    """A write whose worker claimed its final attempt and vanished: the lease is over."""
    body = await accepted(client, user, {"display_name": user}, image)
    (crashed,) = await repository.claim_intents(pool, 1, "crashed", 30)
    await pool.execute(
        "UPDATE intents SET max_attempts = attempts, next_attempt_at = now() - interval '1 second' WHERE id = $1",
        crashed.id,
    )
    return str(body["intent_id"])


async def test_a_claim_racing_a_replay_of_an_intent_dying_at_claim_uploads_to_the_key_it_publishes(
    client: TestClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    intent_id = await final_attempt_with_expired_lease(client, pool, "rio", png(81))
    first_key = await blob_key(settings.database_url, "rio", 1)
    await pool.execute(HOLD_CLAIM)
    async with pool.acquire() as gate, pool.acquire() as worker_b, pool.acquire() as worker_a:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        # Worker B's claim locks the intent and kills it (no attempt left); B has not committed.
        dying = worker_b.transaction()
        await dying.start()
        assert await repository.claim_intents(worker_b, 1, "B", settings.lease_seconds) == []
        # The operator's replay waits for B's lock.
        replaying = asyncio.create_task(operations.replay(pool, settings, uuid.UUID(intent_id)))
        await eventually(lambda: waiting(pool, "transactionid", "FOR UPDATE"), what="replay to wait for B")
        # Worker A's claim takes its snapshot now (intent in_progress, lease expired) and is held.
        await worker_a.execute("SET profiles_test.hold_claim = 'on'")
        claiming = asyncio.create_task(repository.claim_intents(worker_a, 1, "A", settings.lease_seconds))
        await eventually(lambda: waiting(pool, "advisory", "claimed AS"), what="A's claim to be held")
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
    client: TestClient, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "sol", {"display_name": "Sol"}, png(82))
    (claim,) = await repository.claim_intents(pool, 1, "test", settings.lease_seconds)
    elsewhere = dataclasses.replace(claim, blob_key=new_blob_key(settings.s3_key_prefix))
    assert await repository.publish_intent(pool, elsewhere) is None
    row = await intent_row(settings.database_url, body["intent_id"])
    assert (row["state"], row["lease_token"]) == ("in_progress", claim.lease_token)
    assert await pool.fetchval("SELECT state FROM versions WHERE user_id = 'sol'") == "pending"
    assert await repository.publish_intent(pool, claim) is IntentState.DONE

"""Interleavings of the protocol's real statements, reproduced step by step with connections that
hold locks: each step waits until PostgreSQL shows the previous one blocked, never on a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest

from service.core import operations, profiles, repository
from service.core.blobstore import BlobStore
from service.core.domain import IntentState, Metadata, new_blob_key
from service.core.images import inspect_image
from service.core.operations import ReplayOutcome
from service.core.profiles import PutRequest
from service.core.repository import Pool
from service.core.settings import Settings
from tests.support import (
    EMPTY,
    Client,
    accepted,
    assert_problem,
    blob_key,
    eventually,
    intent_row,
    let_grace_pass,
    live_pair,
    made,
    png,
    publish_due,
    put_profile,
    table_counts,
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


# What a write waiting for its profile row is blocked in.
WRITES_A_PROFILE = "INSERT INTO profiles AS p"

# Test-only: an accepted write whose display name is HELD stops in its accept_put statement (the
# profile row already written and locked, its version not yet) until the GATE advisory lock is free.
HELD = "held"
HOLD_NAMED_WRITE = f"""
CREATE FUNCTION hold_named_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_lock({GATE});
    PERFORM pg_advisory_unlock({GATE});
    RETURN NEW;
END $$;
CREATE TRIGGER hold_named_write BEFORE INSERT ON versions FOR EACH ROW
WHEN (NEW.metadata ->> 'display_name' = '{HELD}') EXECUTE FUNCTION hold_named_write();
"""


async def test_writes_queued_behind_a_new_users_refused_first_write_are_numbered_from_1_and_keep_nothing_of_it(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await pool.execute(HOLD_NAMED_WRITE)
    async with pool.acquire() as gate:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        # The first write of a new user records itself (the profile row too) before its If-Match is checked.
        refused = asyncio.create_task(put_profile(client, "neo", {"display_name": HELD}, png(401), {"If-Match": '"1"'}))
        await until_blocked(
            pool, what="the refused write to be held", statement="/* accept_put */", wait_event="advisory"
        )
        # A create-only write of the same user waits for that row.
        create_only = asyncio.create_task(
            put_profile(client, "neo", {"display_name": "create"}, png(402), {"If-None-Match": "*"})
        )
        await until_blocked(
            pool, what="the create-only write to wait", statement=WRITES_A_PROFILE, wait_event="transactionid"
        )
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")
        problem = await assert_problem(await refused, 412)
    assert problem["detail"] == "If-Match is 1, but the newest version is none"
    created = await create_only
    assert created.status == 202, await created.text()
    assert (await created.json())["version"] == 1
    later = await accepted(client, "neo", {"display_name": "later"}, png(403))
    assert later["version"] == 2
    rows = await pool.fetch("SELECT version, metadata ->> 'display_name' AS name FROM versions ORDER BY version")
    assert [(row["version"], row["name"]) for row in rows] == [(1, "create"), (2, "later")]
    assert await table_counts(settings.database_url) == EMPTY | {
        "profiles": 1,
        "versions": 2,
        "intents": 2,
        "staged_images": 2,
    }


async def test_a_retry_racing_its_refused_first_request_is_409_and_the_key_stays_free_for_a_write_that_holds(
    client: Client, settings: Settings, pool: Pool
) -> None:
    key = {"Idempotency-Key": "first-try"}
    await pool.execute(HOLD_NAMED_WRITE)
    async with pool.acquire() as gate:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        refused = asyncio.create_task(
            put_profile(client, "kai", {"display_name": HELD}, png(404), key | {"If-Match": '"1"'})
        )
        await until_blocked(
            pool, what="the refused write to be held", statement="/* accept_put */", wait_event="advisory"
        )
        await assert_problem(await put_profile(client, "kai", {"display_name": HELD}, png(404), key), 409)
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")
        await assert_problem(await refused, 412)
    assert await table_counts(settings.database_url) == EMPTY
    # The refusal kept no answer for its key: the same request without the precondition is accepted once.
    first = await accepted(client, "kai", {"display_name": HELD}, png(404), key)
    assert first["version"] == 1
    assert await accepted(client, "kai", {"display_name": HELD}, png(404), key | {"If-Match": '"7"'}) == first


async def test_a_write_whose_backend_dies_while_its_one_statement_waits_answers_503_and_leaves_no_gap(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await accepted(client, "ava", {"display_name": "one"}, png(405))
    async with pool.acquire() as blocker, blocker.transaction():
        await repository.lock_existing_profile(blocker, "ava")
        # No precondition and no Idempotency-Key: the write is one autocommitted statement.
        writing = asyncio.create_task(put_profile(client, "ava", {"display_name": "lost"}, png(406)))
        pid = await until_blocked(
            pool, what="the write to wait", statement=WRITES_A_PROFILE, wait_event="transactionid"
        )
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        lost = await writing
        await assert_problem(lost, 503)
        assert lost.headers["Retry-After"]
    assert await pool.fetchval("SELECT newest_version FROM profiles WHERE user_id = 'ava'") == 1
    assert await table_counts(settings.database_url) == EMPTY | {
        "profiles": 1,
        "versions": 1,
        "intents": 1,
        "staged_images": 1,
    }
    assert (await accepted(client, "ava", {"display_name": "two"}, png(407)))["version"] == 2


async def test_a_write_whose_client_vanishes_while_its_one_statement_waits_is_recorded_whole_and_goes_live(
    client: Client, settings: Settings, pool: Pool
) -> None:
    await accepted(client, "lou", {"display_name": "one"}, png(408))
    put = PutRequest(
        user_id="lou",
        metadata=Metadata(display_name="two"),
        image=inspect_image(png(409), settings.max_image_side),
        data=png(409),
    )
    lone = await repository.create_pool(settings.database_url, min_size=1, max_size=1, timeout=5)
    async with pool.acquire() as blocker, blocker.transaction():
        await repository.lock_existing_profile(blocker, "lou")
        writing = asyncio.create_task(profiles.accept_put(lone, settings, put))
        pid = await until_blocked(
            pool, what="the write to wait", statement=WRITES_A_PROFILE, wait_event="transactionid"
        )
        # The API's side of the connection goes away (its process died): the server has the whole
        # statement, Sync included, and nothing tells it to give up.
        lone.terminate()
        with pytest.raises(repository.DATABASE_UNAVAILABLE):
            await writing

    async def backend_gone() -> bool:
        return not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

    await eventually(backend_gone, what="the vanished client's backend to end")
    assert await table_counts(settings.database_url) == EMPTY | {
        "profiles": 1,
        "versions": 2,
        "intents": 2,
        "staged_images": 2,
    }
    assert await publish_due(settings) == 2
    assert await live_pair(client, "lou") == (2, "two", png(409))

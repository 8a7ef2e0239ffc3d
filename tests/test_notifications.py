"""Every state change notifies in the statement that makes it: a request waiting for an intent
hears its death, and the workers hear a replay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from service.core import operations, repository
from service.core.domain import IntentState
from service.core.notifications import due_time
from service.core.operations import ReplayOutcome
from service.core.repository import Pool
from service.core.settings import Settings
from tests.support import Client, accepted, intent_row, png

NOTIFIED_WITHIN = 10.0


async def _notifications(settings: Settings, channel: str) -> tuple[asyncpg.Connection[Any], asyncio.Queue[str]]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(settings.database_url)
    queue: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(channel, lambda _c, _p, _ch, payload: queue.put_nowait(payload))
    return conn, queue


async def test_an_intent_dying_at_its_last_failed_attempt_notifies_the_requests_waiting_for_it(
    client: Client, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "nia", {"display_name": "Nia"}, png(901))
    await pool.execute("UPDATE intents SET max_attempts = 1")
    (claim,) = await repository.claim_intents(pool, 1, "test", settings.lease_seconds)
    conn, finished = await _notifications(settings, "profiles_intent_finished")
    try:
        assert await repository.fail_attempt(pool, claim, 0, "boom") is IntentState.DEAD
        assert await asyncio.wait_for(finished.get(), NOTIFIED_WITHIN) == body["intent_id"]
    finally:
        await conn.close()


async def test_an_intent_dying_at_a_claim_notifies_the_requests_waiting_for_it(
    client: Client, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "noe", {"display_name": "Noe"}, png(902))
    await repository.claim_intents(pool, 1, "crashed", settings.lease_seconds)
    await pool.execute("UPDATE intents SET max_attempts = attempts, next_attempt_at = now() - interval '1 second'")
    conn, finished = await _notifications(settings, "profiles_intent_finished")
    try:
        assert await repository.claim_intents(pool, 1, "test", settings.lease_seconds) == []
        assert await asyncio.wait_for(finished.get(), NOTIFIED_WITHIN) == body["intent_id"]
    finally:
        await conn.close()


async def test_a_replay_wakes_the_workers_in_its_own_transaction(
    client: Client, settings: Settings, pool: Pool
) -> None:
    body = await accepted(client, "nor", {"display_name": "Nor"}, png(903))
    await pool.execute("UPDATE intents SET max_attempts = 1")
    (claim,) = await repository.claim_intents(pool, 1, "test", settings.lease_seconds)
    await repository.fail_attempt(pool, claim, 0, "boom")
    conn, woken = await _notifications(settings, "profiles_intents")
    try:
        outcome = await operations.replay(pool, settings, uuid.UUID(body["intent_id"]))
        assert outcome is ReplayOutcome.REPLAYED
        await _due_notice(settings, woken, body["intent_id"])
    finally:
        await conn.close()


async def test_a_put_and_a_release_wake_the_workers_saying_when_their_intent_became_due(
    client: Client, settings: Settings, pool: Pool
) -> None:
    # A worker's scan resumes where it reached; the due time sends it back for an intent that
    # committed after it passed (workers.outbox.ScanStart).
    conn, woken = await _notifications(settings, "profiles_intents")
    try:
        body = await accepted(client, "ora", {"display_name": "Ora"}, png(904))
        await _due_notice(settings, woken, body["intent_id"])
        (claim,) = await repository.claim_intents(pool, 1, "test", settings.lease_seconds)
        await repository.release_intent(pool, claim)
        await _due_notice(settings, woken, body["intent_id"])
    finally:
        await conn.close()


async def _due_notice(settings: Settings, woken: asyncio.Queue[str], intent_id: str) -> None:
    notice = await asyncio.wait_for(woken.get(), NOTIFIED_WITHIN)
    row = await intent_row(settings.database_url, intent_id)
    due = due_time(notice)
    assert notice.split(" ")[0] == intent_id
    assert due is not None and abs(due - row["next_attempt_at"]) < timedelta(milliseconds=1), notice

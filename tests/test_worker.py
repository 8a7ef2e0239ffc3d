"""The worker's rules, driven claim by claim: ordering, supersession, fencing, retries and death."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from benchmarks.figures import SEED_FINISHED, SEED_PENDING
from service.core import repository
from service.core.blobstore import BlobNotFound, BlobStore
from service.core.domain import IntentPurpose
from service.core.notifications import FinishWaiter, due_time
from service.core.queries import query
from service.core.repository import FROM_THE_START, Claim, Pool
from service.core.settings import Settings
from service.core.variants import VariantFormat
from service.dev.embedded import free_port
from tests.support import (
    Client,
    MakeClient,
    StartWorker,
    accepted,
    blob_key,
    finished_intent,
    intent_row,
    live_version,
    made,
    png,
)
from workers.outbox import RESUME_MARGIN, ScanStart, Worker


@pytest.fixture
def worker(settings: Settings, pool: Pool, blobs: BlobStore) -> Worker:
    return Worker(settings, pool, blobs, name="test-worker")


async def claim(pool: Pool, limit: int = 10) -> list[Claim]:
    return await repository.claim_intents(pool, limit, "test-worker", 30)


async def test_an_older_version_finishing_after_a_newer_one_is_superseded_not_published(
    client: Client,
    pool: Pool,
    worker: Worker,
    settings: Settings,
) -> None:
    first = await accepted(client, "ann", {"display_name": "v1"}, png(1))
    second = await accepted(client, "ann", {"display_name": "v2"}, png(2))
    claims = {c.version: c for c in await claim(pool)}
    assert set(claims) == {1, 2}
    await worker.process(claims[2])
    await worker.process(claims[1])
    assert (await intent_row(settings.database_url, second["intent_id"]))["state"] == "done"
    assert (await intent_row(settings.database_url, first["intent_id"]))["state"] == "superseded"
    assert await live_version(client, "ann") == 2


async def test_a_version_older_than_the_live_one_when_claimed_is_superseded_without_uploading(
    client: Client,
    pool: Pool,
    worker: Worker,
    settings: Settings,
    blobs: BlobStore,
) -> None:
    first = await accepted(client, "ben", {"display_name": "v1"}, png(3))
    await accepted(client, "ben", {"display_name": "v2"}, png(4))
    claims = {c.version: c for c in await claim(pool)}
    await worker.process(claims[2])
    await repository.release_intent(pool, claims[1])
    (again,) = await claim(pool)
    assert again.version == 1 and again.already_superseded
    await worker.process(again)
    row = await intent_row(settings.database_url, first["intent_id"])
    assert row["state"] == "superseded"
    with contextlib.suppress(BlobNotFound):
        await blobs.head(await blob_key(settings.database_url, "ben", 1))
        raise AssertionError("a version that can never go live must not be uploaded")


async def test_a_completion_with_a_lost_lease_changes_nothing(
    client: Client,
    pool: Pool,
    worker: Worker,
    settings: Settings,
) -> None:
    body = await accepted(client, "cat", {"display_name": "Cat"}, png(5))
    (stale,) = await claim(pool)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE intents SET next_attempt_at = now() WHERE id = $1", stale.id)
    (current,) = await claim(pool)
    assert current.lease_token != stale.lease_token and current.attempts == 2

    async with pool.acquire() as conn:
        assert await repository.publish_intent(conn, made(stale)) is None
    assert await repository.fail_attempt(pool, stale, 1.0, "stale failure") is None
    row = await intent_row(settings.database_url, body["intent_id"])
    assert row["state"] == "in_progress" and row["lease_token"] == current.lease_token
    assert await live_version(client, "cat") is None

    await worker.process(current)
    row = await intent_row(settings.database_url, body["intent_id"])
    assert row["state"] == "done" and row["last_error"] is None
    assert await live_version(client, "cat") == 1


async def test_failing_uploads_retry_with_backoff_then_die_with_their_reason(
    make_client: MakeClient,
    start_worker: StartWorker,
    settings: Settings,
    pool: Pool,
) -> None:
    client = await make_client(settings.model_copy(update={"max_attempts": 3}))
    await start_worker(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    body = await accepted(client, "dan", {"display_name": "Dan"}, png(6))

    assert (await finished_intent(settings.database_url, body["intent_id"]))["state"] == "dead"
    intent = await (await client.get(body["status_url"])).json()
    assert intent["attempts"] == 3 and intent["max_attempts"] == 3
    assert intent["last_error"].startswith("attempt 3: BlobStoreError")
    assert await live_version(client, "dan") is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT state FROM versions WHERE user_id = 'dan'") == "failed"
        assert await conn.fetchval("SELECT count(*) FROM staged_images") == 1


async def test_an_intent_whose_final_attempt_lost_its_lease_dies_instead_of_running_again(
    client: Client,
    pool: Pool,
    settings: Settings,
) -> None:
    body = await accepted(client, "eve", {"display_name": "Eve"}, png(7))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE intents SET max_attempts = 1")
    (only,) = await claim(pool)
    assert only.attempts == 1
    async with pool.acquire() as conn:
        await conn.execute("UPDATE intents SET next_attempt_at = now() WHERE id = $1", only.id)
    # A `Prefer: wait` request for this intent must hear that it died; its poll would be too late.
    waiter = FinishWaiter(settings.database_url, poll_interval=3600)
    await waiter.listener.ensure()
    checked = asyncio.Event()

    async def finished() -> bool:
        dead: bool = (await intent_row(settings.database_url, body["intent_id"]))["state"] == "dead"
        checked.set()  # the claim below comes after a first check saw the intent alive
        return dead

    waiting = asyncio.create_task(waiter.wait(body["intent_id"], 20, finished))
    await checked.wait()
    assert await claim(pool) == []
    assert await waiting, "the waiter was not told that the intent died"
    await waiter.listener.close()
    row = await intent_row(settings.database_url, body["intent_id"])
    assert row["state"] == "dead" and row["attempts"] == 1
    assert "lost its lease" in row["last_error"]


async def test_the_claim_keeps_one_generic_plan_however_long_the_backlog(pool: Pool) -> None:
    # With the limit a bare parameter, PostgreSQL costed the generic plan at a tenth of the due rows
    # and planned nearly every claim afresh once they were many (1-1.5 ms a plan).
    await pool.execute(SEED_PENDING, 10_000, "0" * 64, 1, b"\x00", [], [], VariantFormat.WEBP.content_type)
    await pool.execute("ANALYZE")
    scan = ScanStart(restart_seconds=3600)  # the first claim from the start, the others resumed
    async with pool.acquire() as conn:
        for _ in range(8):
            claims = await repository.claim_intents(conn, 16, "planner", 60, after=scan.next())
            assert len(claims) == 16
            scan.claimed(claims, asked=16)
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE '/* claim_intents */%'"
        )
        # The plan the worker runs once PostgreSQL keeps the generic one (asyncpg would bind values).
        await conn.execute(f"PREPARE resumed (integer, text, float8, timestamptz) AS {query('claim_intents')}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        lines = [row[0] for row in await conn.fetch("EXPLAIN EXECUTE resumed (16, 'p', 60, now())")]
        await conn.execute("RESET plan_cache_mode; DEALLOCATE resumed")
    assert plans is not None
    assert plans["generic_plans"] > 0 and plans["custom_plans"] <= 5, dict(plans)
    # Where the scan starts bounds the index scan itself, not a filter of what it read.
    due_scan = next(i for i, line in enumerate(lines) if "Index Scan using intents_due" in line)
    assert "next_attempt_at >= $4" in lines[due_scan + 1] and "Index Cond" in lines[due_scan + 1], "\n".join(lines)


async def test_fenced_statements_look_intents_up_by_primary_key_when_a_backlog_formed_after_the_last_vacuum(
    pool: Pool,
) -> None:
    # Vacuumed with nothing due, the partial due index counts as empty until the next analyze, and a
    # plan that scanned it whole (filtered on the fenced state) looked cheapest: 3,000 buffers a batch.
    await pool.execute(SEED_FINISHED, 0, 20_000)
    await pool.execute("VACUUM ANALYZE intents")
    await pool.execute(SEED_PENDING, 10_000, "0" * 64, 1, b"\x00", [], [], VariantFormat.WEBP.content_type)
    claims = await repository.claim_intents(pool, 16, "planner", 60)
    one = claims[0]
    statements = {
        "publish_intents": ([c.id for c in claims], [c.lease_token for c in claims], [c.blob_key for c in claims], []),
        "fail_attempt": (one.id, one.lease_token, 5.0, "error", False),
        "release_intent": (one.id, one.lease_token),
        "attach_variants": (one.id, one.lease_token, []),
    }
    for name, args in statements.items():
        lines = [row[0] for row in await pool.fetch("EXPLAIN " + query(name), *args)]
        reads = [line for line in lines if re.search(r"Scan .*\bon intents\b", line)]
        assert reads and all("using intents_pkey on intents" in line for line in reads), "\n".join([name, *lines])


def _due_scan_buffers(plan: Any) -> int:
    """Buffers the scans of intents_due read in a JSON plan."""
    nodes = [plan]
    total = 0
    while nodes:
        node = nodes.pop()
        if node.get("Index Name") == "intents_due":
            total += node["Shared Hit Blocks"] + node["Shared Read Blocks"]
        nodes.extend(node.get("Plans", []))
    return total


async def _claim_buffers(pool: Pool, after: datetime) -> int:
    """What one claim of 16 from `after` reads of intents_due (the claim itself is rolled back)."""
    async with pool.acquire() as conn, contextlib.AsyncExitStack() as undo:
        transaction = conn.transaction()
        await transaction.start()
        undo.push_async_callback(transaction.rollback)
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query("claim_intents"), 16, "explainer", 60, after
        )
        return _due_scan_buffers(json.loads(explained)[0]["Plan"])


async def test_a_claim_resuming_where_the_last_one_reached_skips_what_was_claimed_while_a_snapshot_holds_cleanup_back(
    pool: Pool, settings: Settings
) -> None:
    # Until no snapshot is older than a claim, PostgreSQL cannot mark the index entries the claim
    # left dead, and every scan from the start walks all of them: the longer a report or a dump
    # runs, the more each claim reads.
    await pool.execute(SEED_PENDING, 3_000, "0" * 64, 1, b"\x00", [], [], VariantFormat.WEBP.content_type)
    await pool.execute(
        "UPDATE intents SET next_attempt_at = now() - interval '1 hour' + make_interval(secs => n) "
        "FROM (SELECT id AS ranked, row_number() OVER (ORDER BY id) AS n FROM intents) r "
        "WHERE id = ranked"
    )
    await pool.execute("VACUUM intents")
    report = await asyncpg.connect(settings.database_url)
    try:
        async with report.transaction(isolation="repeatable_read"):
            await report.fetchval("SELECT count(*) FROM profiles")
            scan = ScanStart(restart_seconds=3600)
            for _ in range(150):
                claims = await repository.claim_intents(pool, 16, "worker", 60, after=scan.next())
                assert len(claims) == 16
                scan.claimed(claims, asked=16)
            from_the_start = await _claim_buffers(pool, FROM_THE_START)
            resumed = await _claim_buffers(pool, scan.next())
    finally:
        await report.close()
    assert from_the_start > 20 * resumed, (from_the_start, resumed)


def test_a_scan_resumes_where_it_reached_goes_back_for_what_notices_announce_and_restarts_once_an_interval() -> None:
    now = [0.0]
    scan = ScanStart(restart_seconds=1.0, clock=lambda: now[0])
    due = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    later, earlier = due + timedelta(seconds=5), due - timedelta(hours=1)

    def claim(*reached: datetime, asked: int = 16) -> datetime:
        start = scan.next()
        scan.claimed([_claimed(each) for each in reached], asked=asked)
        return start

    assert claim(due, later) == FROM_THE_START  # nothing reached yet
    now[0] = 0.5
    assert claim(earlier, asked=1) == later - RESUME_MARGIN  # a resumed scan never goes back on its own
    assert claim() == later - RESUME_MARGIN
    scan.notified(f"{uuid.uuid4()} {earlier.timestamp()}")  # committed after the scan passed its place
    scan.notified(f"{uuid.uuid4()} {due.timestamp()}")
    assert claim(earlier, asked=1) == earlier - RESUME_MARGIN  # every slot filled: it goes on from there
    assert claim(due) == earlier - RESUME_MARGIN  # and took all that was due: on from where it reached
    assert claim(later, asked=1) == due - RESUME_MARGIN
    assert claim() == later - RESUME_MARGIN
    scan.notified(f"{uuid.uuid4()} {due.timestamp()}")
    assert scan.next() == due - RESUME_MARGIN  # and this claim fails: the next goes back all the same
    assert claim(later, asked=1) == due - RESUME_MARGIN
    scan.notified(str(uuid.uuid4()))  # from a release that did not say when
    assert claim() == FROM_THE_START  # finding nothing, it stays where it was
    assert scan.seconds_to_restart() == 1.0
    now[0] = 1.6
    assert scan.seconds_to_restart() < 0
    assert claim(earlier, asked=1) == FROM_THE_START  # an interval on; it goes on from what it reached
    assert claim(later, asked=1) == earlier - RESUME_MARGIN
    now[0] = 2.7
    assert scan.next() == FROM_THE_START  # fails: the restart is still due
    assert claim() == FROM_THE_START
    assert claim() == later - RESUME_MARGIN


@pytest.mark.parametrize(
    "payload", ["", "4bf4bcb7", "4bf4bcb7 nan", "4bf4bcb7 inf", "x -inf", "x 1e400", "x 1e20", "x y"]
)
def test_a_notice_that_does_not_say_when_its_intent_became_due_reads_as_none(payload: str) -> None:
    assert due_time(payload) is None


def _claimed(scan_reached: datetime) -> Claim:
    return Claim(
        id=uuid.uuid4(),
        user_id="u",
        version=1,
        purpose=IntentPurpose.PUBLISH,
        attempts=1,
        lease_token=uuid.uuid4(),
        scan_reached=scan_reached,
        queued_seconds=0.0,
        blob_key="k",
        sha256="0" * 64,
        size=1,
        content_type="image/png",
        live_version=None,
        traceparent=None,
        replay_traceparent=None,
        data=b"",
    )


async def test_an_intent_that_became_claimable_behind_where_the_scans_reached_without_a_notice_is_still_published(
    client: Client, start_worker: StartWorker, settings: Settings, pool: Pool
) -> None:
    behind = await accepted(client, "behind", {"display_name": "Behind"}, png(11))
    async with pool.acquire() as conn, conn.transaction():
        # Held, so the worker's scan skips it and reaches the other intent's due time first.
        await conn.execute("SELECT 1 FROM intents WHERE id = $1 FOR UPDATE", uuid.UUID(behind["intent_id"]))
        ahead = await accepted(client, "ahead", {"display_name": "Ahead"}, png(12))
        await start_worker(settings)
        await finished_intent(settings.database_url, ahead["intent_id"])
        await conn.execute(
            "UPDATE intents SET next_attempt_at = now() - interval '1 hour' WHERE id = $1",
            uuid.UUID(behind["intent_id"]),
        )
    assert (await finished_intent(settings.database_url, behind["intent_id"]))["state"] == "done"


@pytest.mark.parametrize("why", ["every slot taken", "its last claim failed"])
async def test_an_idle_worker_with_a_scan_from_the_start_due_still_waits_for_a_wake_when(
    why: str, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    # Waiting only until the scan from the start is due would be no wait at all here: the loop
    # would find no slot, or fail again, at once and again.
    worker = Worker(settings.model_copy(update={"poll_interval_seconds": 1.0}), pool, blobs)
    assert worker._scan.seconds_to_restart() <= 0
    never = asyncio.Event()

    async def attempt() -> None:
        await never.wait()

    if why == "every slot taken":
        worker._running = {asyncio.create_task(attempt()) for _ in range(settings.worker_concurrency)}
    else:
        worker._claim_failed = True
    idle = asyncio.create_task(worker._idle())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not idle.done()
    worker._wake.set()
    await idle
    for task in worker._running:
        task.cancel()

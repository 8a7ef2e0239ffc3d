"""Real worker processes killed, paused and stopped at the worst moments: nothing acknowledged is lost,
reads keep returning the previous version exactly, and a stale worker can never complete."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.core.blobstore import BlobStore
from service.core.repository import Pool
from service.core.settings import Settings
from tests.support import (
    Client,
    HangingS3,
    MakeClient,
    StallingS3,
    WorkerProcess,
    accepted,
    blob_key,
    eventually,
    finished_intent,
    intent_row,
    live_pair,
    png,
    publish_due,
    until_blocked,
)


@pytest.fixture
async def hanging_s3() -> AsyncIterator[HangingS3]:
    s3 = await HangingS3().start()
    yield s3
    s3.close()


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        await worker.kill()


def short_lease(settings: Settings, lease: float = 3.0) -> Settings:
    return settings.model_copy(update={"lease_seconds": lease, "attempt_timeout_seconds": lease / 2})


async def start(workers: list[WorkerProcess], settings: Settings) -> WorkerProcess:
    worker = await WorkerProcess(settings).start()
    workers.append(worker)
    return worker


async def live_v1_and_pending_v2(client: Client, settings: Settings, user: str) -> dict[str, Any]:
    await accepted(client, user, {"display_name": "one"}, png(1))
    assert await publish_due(settings) == 1
    return await accepted(client, user, {"display_name": "two"}, png(2))


async def finished_done(db_url: str, intent_id: str) -> asyncpg.Record:
    row = await finished_intent(db_url, intent_id)
    assert row["state"] == "done", row["last_error"]
    return row


async def take_over(workers: list[WorkerProcess], settings: Settings, intent_id: str) -> None:
    """A new worker finishes the intent on its first attempt, once the dead worker's short lease
    (stored in the row) has run out. It has the usual attempt time-out: a first attempt of a fresh
    process on a loaded machine can outlast the short one, which would be a retry, not a loss. The
    dead worker's attempts are counted once it is dead: its own short time-out may have run out
    before it died (a hanging upload on a loaded machine), and it claimed the intent again."""
    charged = (await intent_row(settings.database_url, intent_id))["attempts"]
    assert charged >= 1
    await start(workers, settings)
    assert (await finished_done(settings.database_url, intent_id))["attempts"] == charged + 1


async def hanging_worker_holds(
    workers: list[WorkerProcess], settings: Settings, hanging_s3: HangingS3, intent_id: str
) -> WorkerProcess:
    """A worker whose S3 never answers, once it has claimed the intent and its upload hangs."""
    worker = await start(workers, settings.model_copy(update={"s3_endpoint_url": hanging_s3.url}))
    await hanging_s3.requested((await intent_row(settings.database_url, intent_id))["blob_key"])
    assert (await intent_row(settings.database_url, intent_id))["state"] == "in_progress"
    return worker


async def test_a_worker_killed_after_claiming_and_before_uploading_loses_nothing(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: HangingS3,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    v2 = await live_v1_and_pending_v2(client, fast, "kim")
    doomed = await hanging_worker_holds(workers, fast, hanging_s3, v2["intent_id"])
    await doomed.kill()

    assert await live_pair(client, "kim") == (1, "one", png(1))
    await take_over(workers, settings, v2["intent_id"])
    assert await live_pair(client, "kim") == (2, "two", png(2))


async def test_a_worker_killed_after_uploading_and_before_publishing_loses_nothing(
    make_client: MakeClient,
    settings: Settings,
    blobs: BlobStore,
    pool: Pool,
    workers: list[WorkerProcess],
) -> None:
    slow = short_lease(settings, lease=8.0)
    client = await make_client(slow)
    v2 = await live_v1_and_pending_v2(client, slow, "lou")
    key = await blob_key(slow.database_url, "lou", 2)
    # Holding the profile row makes the worker's publishing statement wait after its upload.
    blocker = await asyncpg.connect(slow.database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT 1 FROM profiles WHERE user_id = 'lou' FOR UPDATE")
    doomed = await start(workers, slow)
    # Nothing else in this database can wait for a lock.
    backend = await until_blocked(pool, what="the publishing statement to wait")
    assert (await blobs.head(key)).size == len(png(2)), "the worker publishes only after its upload"
    await doomed.kill()
    # A crashed host takes its connections with it; PostgreSQL would notice by keepalive. End the
    # dead worker's session now, so its statement, which never ran, cannot run later either.
    assert await blocker.fetchval("SELECT pg_terminate_backend($1)", backend)
    assert (await intent_row(slow.database_url, v2["intent_id"]))["attempts"] == 1
    await transaction.rollback()
    await blocker.close()

    assert await live_pair(client, "lou") == (1, "one", png(1))
    assert (await intent_row(slow.database_url, v2["intent_id"]))["state"] == "in_progress"
    await take_over(workers, settings, v2["intent_id"])
    assert await live_pair(client, "lou") == (2, "two", png(2))
    assert await blob_key(slow.database_url, "lou", 2) == key


async def served_variants(client: Client, user: str) -> dict[str, tuple[int, str]]:
    """Each variant of the live version, fetched: its version and the sha256 the body lists, once
    the bytes served match it."""
    body = await (await client.get(f"/v1/profiles/{user}")).json()
    served = {}
    for name, variant in body["variants"].items():
        response = await client.get(f"/v1/profiles/{user}/image?variant={name}")
        assert response.status == 200 and response.headers["ETag"] == f'"{variant["sha256"]}"'
        assert hashlib.sha256(await response.read()).hexdigest() == variant["sha256"]
        served[name] = (body["version"], variant["sha256"])
    return served


async def test_a_worker_killed_between_variant_uploads_leaves_the_previous_version_live_with_all_its_variants(
    make_client: MakeClient, settings: Settings, blobs: BlobStore, pool: Pool, workers: list[WorkerProcess]
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    v2 = await live_v1_and_pending_v2(client, fast, "kit")
    before = await served_variants(client, "kit")
    assert set(before) == {spec.name for spec in fast.variants}
    stalled_key = await pool.fetchval("SELECT blob_key FROM version_variants WHERE version = 2 AND name = 'medium'")
    original = await blob_key(fast.database_url, "kit", 2)
    stalling = await StallingS3(fast.s3_endpoint_url or "", stall_on=stalled_key).start()
    try:
        doomed = await start(workers, fast.model_copy(update={"s3_endpoint_url": stalling.url}))
        await asyncio.wait_for(stalling.stalled.wait(), 30)

        async def original_uploaded() -> bool:
            return original in await blobs.list_keys(fast.s3_key_prefix)

        await eventually(original_uploaded, what="v2's image to be uploaded while its medium variant hangs")
        await doomed.kill()
    finally:
        await stalling.close()

    assert await live_pair(client, "kit") == (1, "one", png(1))
    assert await served_variants(client, "kit") == before
    assert (await client.get("/v1/profiles/kit/versions/2/image?variant=thumb")).status == 404
    await take_over(workers, settings, v2["intent_id"])
    after = await served_variants(client, "kit")
    assert set(after) == set(before) and {version for version, _ in after.values()} == {2}


async def test_a_stale_worker_paused_past_its_lease_cannot_complete_after_another_worker_did(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: HangingS3,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    v2 = await live_v1_and_pending_v2(client, fast, "meg")
    stale = await hanging_worker_holds(workers, fast, hanging_s3, v2["intent_id"])
    stale.signal(signal.SIGSTOP)

    fresh = await start(workers, settings)  # the usual attempt time-out, as in take_over
    done = await finished_done(fast.database_url, v2["intent_id"])
    stale.signal(signal.SIGCONT)
    # A stopping worker lets its attempt end first: the hung upload passes its deadline, and the
    # stale worker tries to record the failure with its lost lease.
    assert await stale.stop() == 0

    after = await intent_row(fast.database_url, v2["intent_id"])
    assert (after["state"], after["attempts"], after["last_error"]) == ("done", 2, None)
    assert after["updated_at"] == done["updated_at"]
    assert await live_pair(client, "meg") == (2, "two", png(2))
    assert await fresh.stop() == 0


async def test_sigterm_lets_a_worker_end_its_attempt_and_exit_leaving_the_intent_claimable(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: HangingS3,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    body = await accepted(client, "ned", {"display_name": "Ned"}, png(3))
    worker = await hanging_worker_holds(workers, fast, hanging_s3, body["intent_id"])
    assert await worker.stop() == 0
    row = await intent_row(fast.database_url, body["intent_id"])
    assert row["state"] == "pending" and row["lease_token"] is None and row["attempts"] == 1
    assert "TimeoutError" in row["last_error"]


async def test_a_second_stop_signal_hands_the_intent_back_at_once_with_its_attempt_refunded(
    make_client: MakeClient, settings: Settings, hanging_s3: HangingS3, workers: list[WorkerProcess]
) -> None:
    patient = short_lease(settings, lease=60.0)
    client = await make_client(patient)
    body = await accepted(client, "ola", {"display_name": "Ola"}, png(4))
    worker = await hanging_worker_holds(workers, patient, hanging_s3, body["intent_id"])
    # Two different signals: a second SIGTERM sent while the first is still pending would merge
    # with it, and nothing outside the worker shows when the first has arrived.
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGINT)
    assert await worker.stop() == 0
    row = await intent_row(patient.database_url, body["intent_id"])
    assert (row["state"], row["attempts"], row["lease_token"]) == ("pending", 0, None)

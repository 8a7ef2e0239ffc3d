"""Real worker processes killed, paused and stopped at the worst moments: nothing acknowledged is lost,
reads keep returning the previous version exactly, and a stale worker can never complete."""

from __future__ import annotations

import base64
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.core.blobstore import BlobNotFound, BlobStore
from service.core.settings import Settings
from tests.support import (
    Client,
    MakeClient,
    WorkerProcess,
    accepted,
    blackhole,
    blob_key,
    eventually,
    intent_row,
    png,
    publish_due,
)


@pytest.fixture
async def hanging_s3() -> AsyncIterator[str]:
    server, url = await blackhole()
    yield url
    server.close()


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


async def pair(client: Client, user: str) -> tuple[str, bytes]:
    response = await client.get(f"/v1/profiles/{user}?embed=image")
    assert response.status == 200
    body = await response.json()
    return body["metadata"]["display_name"], base64.b64decode(body["image"]["data"])


async def live_v1_and_pending_v2(client: Client, settings: Settings, user: str) -> dict[str, Any]:
    await accepted(client, user, {"display_name": "one"}, png(1))
    assert await publish_due(settings) == 1
    return await accepted(client, user, {"display_name": "two"}, png(2))


async def state_is(db_url: str, intent_id: str, state: str) -> asyncpg.Record | None:
    row = await intent_row(db_url, intent_id)
    return row if row["state"] == state else None


async def hanging_worker_holds(
    workers: list[WorkerProcess], settings: Settings, hanging_s3: str, intent_id: str
) -> tuple[WorkerProcess, asyncpg.Record]:
    """A worker whose S3 never answers, once it has claimed the intent."""
    worker = await start(workers, settings.model_copy(update={"s3_endpoint_url": hanging_s3}))
    claimed = await eventually(lambda: state_is(settings.database_url, intent_id, "in_progress"))
    return worker, claimed


async def test_a_worker_killed_after_claiming_and_before_uploading_loses_nothing(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: str,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    v2 = await live_v1_and_pending_v2(client, fast, "kim")
    doomed, claimed = await hanging_worker_holds(workers, fast, hanging_s3, v2["intent_id"])
    assert claimed["attempts"] == 1
    await doomed.kill()

    assert await pair(client, "kim") == ("one", png(1))
    await start(workers, fast)
    done = await eventually(lambda: state_is(fast.database_url, v2["intent_id"], "done"))
    assert done["attempts"] == 2
    assert await pair(client, "kim") == ("two", png(2))


async def test_a_worker_killed_after_uploading_and_before_publishing_loses_nothing(
    make_client: MakeClient,
    settings: Settings,
    blobs: BlobStore,
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

    async def uploaded() -> bool:
        try:
            await blobs.head(key)
        except BlobNotFound:
            return False
        return True

    async def waiting_backend() -> int | None:
        pid: int | None = await blocker.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return pid

    await eventually(uploaded, what="the upload")
    backend = await eventually(waiting_backend, what="the publishing statement to wait")
    await doomed.kill()
    # A crashed host takes its connections with it; PostgreSQL would notice by keepalive. End the
    # dead worker's session now, so its statement, which never ran, cannot run later either.
    assert await blocker.fetchval("SELECT pg_terminate_backend($1)", backend)
    assert (await intent_row(slow.database_url, v2["intent_id"]))["attempts"] == 1
    await transaction.rollback()
    await blocker.close()

    assert await pair(client, "lou") == ("one", png(1))
    assert (await intent_row(slow.database_url, v2["intent_id"]))["state"] == "in_progress"
    await start(workers, slow)
    done = await eventually(lambda: state_is(slow.database_url, v2["intent_id"], "done"))
    assert done["attempts"] == 2
    assert await pair(client, "lou") == ("two", png(2))
    assert await blob_key(slow.database_url, "lou", 2) == key


async def test_a_stale_worker_paused_past_its_lease_cannot_complete_after_another_worker_did(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: str,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    v2 = await live_v1_and_pending_v2(client, fast, "meg")
    stale, _ = await hanging_worker_holds(workers, fast, hanging_s3, v2["intent_id"])
    stale.signal(signal.SIGSTOP)

    fresh = await start(workers, fast)
    done = await eventually(lambda: state_is(fast.database_url, v2["intent_id"], "done"))
    stale.signal(signal.SIGCONT)
    await stale.wait_for_line(rf"intent {v2['intent_id']} .*lease lost")

    after = await intent_row(fast.database_url, v2["intent_id"])
    assert (after["state"], after["attempts"], after["last_error"]) == ("done", 2, None)
    assert after["updated_at"] == done["updated_at"]
    assert await pair(client, "meg") == ("two", png(2))
    assert await stale.stop() == 0
    assert await fresh.stop() == 0


async def test_sigterm_lets_a_worker_end_its_attempt_and_exit_leaving_the_intent_claimable(
    make_client: MakeClient,
    settings: Settings,
    hanging_s3: str,
    workers: list[WorkerProcess],
) -> None:
    fast = short_lease(settings)
    client = await make_client(fast)
    body = await accepted(client, "ned", {"display_name": "Ned"}, png(3))
    worker, _ = await hanging_worker_holds(workers, fast, hanging_s3, body["intent_id"])
    assert await worker.stop() == 0
    row = await intent_row(fast.database_url, body["intent_id"])
    assert row["state"] == "pending" and row["lease_token"] is None and row["attempts"] == 1
    assert "TimeoutError" in row["last_error"]


async def test_a_second_sigterm_hands_the_intent_back_at_once_with_its_attempt_refunded(
    make_client: MakeClient, settings: Settings, hanging_s3: str, workers: list[WorkerProcess]
) -> None:
    patient = short_lease(settings, lease=60.0)
    client = await make_client(patient)
    body = await accepted(client, "ola", {"display_name": "Ola"}, png(4))
    worker, _ = await hanging_worker_holds(workers, patient, hanging_s3, body["intent_id"])
    worker.signal(signal.SIGTERM)
    await worker.wait_for_line("stopping: finishing 1 intent")
    worker.signal(signal.SIGTERM)
    assert await worker.stop() == 0
    row = await intent_row(patient.database_url, body["intent_id"])
    assert (row["state"], row["attempts"], row["lease_token"]) == ("pending", 0, None)

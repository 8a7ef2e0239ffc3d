"""A short soak: writers and readers against three worker processes that keep being SIGKILLed.

At the end every acknowledged write is accounted for, every live version has its blob, and after
the grace period the bucket holds exactly the live blobs. Bounded: a fixed number of writes.
"""

from __future__ import annotations

import asyncio
import base64
import random
import signal
from collections.abc import AsyncIterator

import pytest

from service.core import repository
from service.core.blobstore import BlobStore
from service.core.settings import Settings
from tests.support import (
    Client,
    WorkerProcess,
    accepted,
    eventually,
    let_grace_pass,
    live_keys,
    png,
    until_intents_finish,
)

USERS = ("soak-a", "soak-b", "soak-c", "soak-d")
WRITES_PER_USER = 12
WORKERS = 3


@pytest.fixture
def soak_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "lease_seconds": 2.0,
            "attempt_timeout_seconds": 1.0,
            "gc_interval_seconds": 0.2,
            "worker_metrics_port": 0,
            "worker_concurrency": 2,
        }
    )


@pytest.fixture
async def fleet(soak_settings: Settings) -> AsyncIterator[list[WorkerProcess]]:
    workers = [await WorkerProcess(soak_settings).start() for _ in range(WORKERS)]
    yield workers
    for worker in workers:
        await worker.kill()


async def test_random_worker_kills_lose_no_acknowledged_write_and_leave_exactly_the_live_blobs(
    client: Client, soak_settings: Settings, fleet: list[WorkerProcess], blobs: BlobStore
) -> None:
    chaos = random.Random(20261127)
    written: dict[str, dict[int, tuple[str, bytes]]] = {user: {} for user in USERS}
    intents: list[str] = []
    kills = reads = 0
    writing = True

    async def writer(user: str, offset: int) -> None:
        for i in range(WRITES_PER_USER):
            name, image = f"{user}-{i}", png(offset + i)
            body = await accepted(client, user, {"display_name": name}, image)
            written[user][body["version"]] = (name, image)
            intents.append(body["intent_id"])
            await asyncio.sleep(chaos.uniform(0.1, 0.5))

    async def reader(user: str) -> None:
        nonlocal reads
        while writing:
            response = await client.get(f"/v1/profiles/{user}?embed=image")
            if response.status == 200:
                body = await response.json()
                pair = (body["metadata"]["display_name"], base64.b64decode(body["image"]["data"]))
                assert written[user][body["version"]] == pair, "a read returned a pair nobody wrote"
                reads += 1
            else:
                assert response.status == 404
            await asyncio.sleep(0.02)

    async def killer() -> None:
        nonlocal kills
        while writing:
            await asyncio.sleep(chaos.uniform(0.2, 0.6))
            index = chaos.randrange(len(fleet))
            fleet[index].signal(signal.SIGKILL)
            await fleet[index].kill()
            fleet[index] = await WorkerProcess(soak_settings).start()
            kills += 1

    readers = [asyncio.create_task(reader(user)) for user in USERS]
    killing = asyncio.create_task(killer())
    await asyncio.gather(*(writer(user, 1000 * (n + 1)) for n, user in enumerate(USERS)))
    writing = False
    await asyncio.gather(killing, *readers)

    pool = await repository.create_pool(soak_settings.database_url, min_size=1, max_size=2, timeout=5)
    try:

        async def all_finished() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM intents WHERE state IN ('pending', 'in_progress')")

        await until_intents_finish(soak_settings.database_url, all_finished, what="every intent to finish", timeout=60)
        states = {
            r["state"]: r["n"]
            for r in await pool.fetch(
                "SELECT state, count(*) AS n FROM intents WHERE id = ANY($1::uuid[]) GROUP BY state", intents
            )
        }
        assert sum(states.values()) == len(intents) == len(USERS) * WRITES_PER_USER
        assert set(states) <= {"done", "superseded"}, f"unaccounted writes: {states}"

        for user in USERS:
            newest = max(written[user])
            response = await client.get(f"/v1/profiles/{user}?embed=image")
            body = await response.json()
            assert body["version"] == newest
            assert (body["metadata"]["display_name"], base64.b64decode(body["image"]["data"])) == written[user][newest]

        await let_grace_pass(pool, soak_settings.gc_grace_seconds)
        live = await live_keys(pool)

        # Polled: the bucket tells nobody when a collector deletes from it.
        async def only_live_blobs_left() -> bool:
            return set(await blobs.list_keys(soak_settings.s3_key_prefix)) == live

        await eventually(only_live_blobs_left, timeout=60, interval=0.2, what="the workers to collect unneeded blobs")
    finally:
        await pool.close()
    print(f"soak: {len(intents)} writes, {reads} reads, {kills} worker kills, {len(live)} live blobs, 0 violations")
    assert kills > 0 and reads > 0

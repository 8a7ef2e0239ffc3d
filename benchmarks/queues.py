"""The outbox machinery without S3, and PgQueuer on the same database, as worker processes.

`noop-worker` is our Worker with a blob store that stores nothing: benchmark-only, it exists in
this package alone and no production entry point can reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from benchmarks.load import payload
from service.core import repository
from service.core.blobstore import BlobStore
from service.core.settings import Settings
from workers.outbox import Worker


class NoopBlobStore(BlobStore):
    """Accepts every upload instantly: what is left to measure is the outbox itself."""

    def __init__(self) -> None:
        super().__init__(client=None, bucket="noop")

    async def put_once(self, key: str, data: bytes, sha256: str, content_type: str) -> None:
        return None


async def noop_worker() -> None:
    settings = Settings()  # type: ignore[call-arg]  # database_url comes from PROFILES_DATABASE_URL
    pool = await repository.create_pool(
        settings.database_url, min_size=1, max_size=settings.worker_concurrency + 2, timeout=10
    )
    worker = Worker(settings, pool, NoopBlobStore())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    try:
        await worker.run()
    finally:
        await pool.close()


async def pgqueuer_install() -> dict[str, Any]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(os.environ["PROFILES_DATABASE_URL"])
    try:
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.has_table("pgqueuer"):
            await queries.install()
        await queries.clear_queue()
    finally:
        await conn.close()
    return {"installed": True}


async def pgqueuer_enqueue(jobs: int, payload_bytes: int) -> dict[str, Any]:
    """Each job carries the bytes our intents carry in the same figure (the staged image), so both
    queues move the same data."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    data = payload(payload_bytes) if payload_bytes else b""
    conn = await asyncpg.connect(os.environ["PROFILES_DATABASE_URL"])
    try:
        await Queries(AsyncpgDriver(conn)).enqueue(["fetch"] * jobs, [data] * jobs, [0] * jobs)
    finally:
        await conn.close()
    return {"enqueued": jobs}


async def pgqueuer_drain(dequeuers: int, batch_size: int, limit: int) -> dict[str, Any]:
    """PgQueuer's drain benchmark method: several PgQueuer instances empty a pre-filled queue, or
    stop once they have run `limit` jobs between them (0: no limit)."""
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    done = 0
    conns = [await asyncpg.connect(os.environ["PROFILES_DATABASE_URL"]) for _ in range(dequeuers)]
    instances = [PgQueuer(AsyncpgDriver(conn)) for conn in conns]
    for pgq in instances:

        @pgq.entrypoint("fetch")
        async def fetch(job: Job) -> None:
            nonlocal done
            done += 1
            if done == limit:
                for each in instances:
                    each.shutdown.set()

    started = time.time()
    await asyncio.gather(*(pgq.run(batch_size=batch_size, mode=QueueExecutionMode.drain) for pgq in instances))
    ended = time.time()
    for conn in conns:
        await conn.close()
    return {"done": done, "started": started, "ended": ended}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["noop-worker", "pgqueuer-install", "pgqueuer-enqueue", "pgqueuer-drain"])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--payload-bytes", type=int, default=0)
    parser.add_argument("--dequeuers", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--limit", type=int, default=0, help="jobs to run, 0: until the queue is empty")
    args = parser.parse_args()
    if args.command == "noop-worker":
        asyncio.run(noop_worker())
        return
    jobs: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "pgqueuer-install": pgqueuer_install,
        "pgqueuer-enqueue": lambda: pgqueuer_enqueue(args.jobs, args.payload_bytes),
        "pgqueuer-drain": lambda: pgqueuer_drain(args.dequeuers, args.batch_size, args.limit),
    }
    print(json.dumps(asyncio.run(jobs[args.command]())))


if __name__ == "__main__":
    main()

"""Reference implementations that bound our figures, each run as its own process: raw asyncpg
inserts, a minimal aiohttp app doing the same parse + insert and the same primary-key select, raw
aioboto3 PutObject/GetObject, and the naive design (upload to S3 inside the request, then the row)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any

import aioboto3
import asyncpg
from aiobotocore.config import AioConfig
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from benchmarks.load import payload, percentiles
from service.core import repository

BENCH_TABLE = """CREATE TABLE IF NOT EXISTS bench_rows (
    id bigserial PRIMARY KEY, user_id text NOT NULL, metadata jsonb NOT NULL, data bytea, blob_key text)"""
INSERT = "INSERT INTO bench_rows (user_id, metadata, data, blob_key) VALUES ($1, $2, $3, $4)"
METADATA = json.dumps({"display_name": "bench"})


def _s3_client() -> Any:
    # The same timeouts and retry budget as the service's own client, so neither side waits longer.
    config = AioConfig(connect_timeout=3, read_timeout=10, retries={"total_max_attempts": 2, "mode": "standard"})
    return aioboto3.Session().client(
        "s3", endpoint_url=os.environ["PROFILES_S3_ENDPOINT_URL"], region_name="us-east-1", config=config
    )


async def _timed(count: int, clients: int, job: Any) -> dict[str, Any]:
    gate = asyncio.Semaphore(clients)
    latencies: list[float] = []

    async def one(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            await job(n)
            latencies.append((time.perf_counter() - started) * 1000)

    started, wall = time.perf_counter(), time.time()
    await asyncio.gather(*(one(n) for n in range(count)))
    seconds = time.perf_counter() - started
    return {
        "ok": count,
        "seconds": seconds,
        "rate": count / seconds,
        "latency_ms": percentiles(latencies),
        "started": wall,
        "ended": wall + seconds,
    }


async def raw_insert(args: argparse.Namespace) -> dict[str, Any]:
    data = payload(args.image_bytes)
    pool = await asyncpg.create_pool(os.environ["PROFILES_DATABASE_URL"], min_size=args.clients, max_size=args.clients)
    await pool.execute(BENCH_TABLE)
    try:

        async def insert(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(INSERT, f"u{n}", METADATA, data, None)

        return await _timed(args.count, args.clients, insert)
    finally:
        await pool.close()


async def s3_put(args: argparse.Namespace) -> dict[str, Any]:
    data = payload(args.image_bytes)
    async with _s3_client() as s3:

        async def put(n: int) -> None:
            await s3.put_object(Bucket=args.bucket, Key=f"bench/{uuid.uuid4().hex}", Body=data)

        result = await _timed(args.count, args.clients, put)
    return result | {"bytes": args.count * len(data)}


async def s3_get(args: argparse.Namespace) -> dict[str, Any]:
    keys = json.loads(args.keys)
    async with _s3_client() as s3:
        size = 0

        async def get(n: int) -> None:
            nonlocal size
            response = await s3.get_object(Bucket=args.bucket, Key=keys[n % len(keys)])
            async with response["Body"] as body:
                size += len(await body.read())

        result = await _timed(args.count, args.clients, get)
    return result | {"bytes": size}


async def _read_form(request: web.Request) -> tuple[str, bytes]:
    reader = await request.multipart()
    parts: dict[str, bytes] = {}
    while (part := await reader.next()) is not None:
        parts[part.name or ""] = await part.read()  # type: ignore[union-attr]
    return parts["metadata"].decode(), parts["image"]


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def minimal_app(pool: asyncpg.Pool) -> web.Application:
    async def put(request: web.Request) -> web.Response:
        metadata, image = await _read_form(request)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT, request.match_info["user_id"], metadata, image, None)
        return web.json_response({"ok": True}, status=202)

    async def get(request: web.Request) -> web.Response:
        version = await repository.get_live_version(pool, request.match_info["user_id"])
        if version is None:
            return web.json_response({}, status=404)
        return web.json_response({"version": version.version, "metadata": version.metadata})

    app = web.Application()
    app.router.add_put("/v1/profiles/{user_id}", put)
    app.router.add_get("/v1/profiles/{user_id}", get)
    app.router.add_get("/healthz", healthz)
    return app


def naive_app(pool: asyncpg.Pool, s3: Any, bucket: str) -> web.Application:
    """The design the brief warns about: the blob store is called inside the request."""

    async def put(request: web.Request) -> web.Response:
        metadata, image = await _read_form(request)
        key = f"naive/{uuid.uuid4().hex}"
        try:
            await s3.put_object(Bucket=bucket, Key=key, Body=image)
        except (BotoCoreError, ClientError):
            return web.json_response({"error": "blob store unavailable"}, status=503)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT, request.match_info["user_id"], metadata, None, key)
        return web.json_response({"ok": True}, status=200)

    app = web.Application()
    app.router.add_put("/v1/profiles/{user_id}", put)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(args: argparse.Namespace) -> None:
    pool = await repository.create_pool(os.environ["PROFILES_DATABASE_URL"], min_size=1, max_size=20, timeout=5)
    await pool.execute(BENCH_TABLE)
    async with _s3_client() as s3:
        app = minimal_app(pool) if args.command == "minimal-app" else naive_app(pool, s3, args.bucket)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["insert", "s3-put", "s3-get", "minimal-app", "naive-app"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--image-bytes", type=int, default=64 * 1024)
    parser.add_argument("--bucket", default="profiles")
    parser.add_argument("--keys", default="[]")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reps", type=int, default=1, help="repetitions, one result each")
    args = parser.parse_args()
    if args.command in {"minimal-app", "naive-app"}:
        asyncio.run(serve(args))
        return
    job = {"insert": raw_insert, "s3-put": s3_put, "s3-get": s3_get}[args.command]
    print(json.dumps([asyncio.run(job(args)) for _ in range(args.reps)]))


if __name__ == "__main__":
    main()

"""The load driver, run as its own process: PUTs or GETs at a concurrency (or a paced rate), printing
one JSON line: a list with throughput, latency percentiles and status counts of each repetition."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import time
from collections import Counter
from typing import Any

import aiohttp
from PIL import Image


def payload(size: int, seed: int = 0) -> bytes:
    """A PNG of about `size` bytes: random pixels, so compression cannot shrink it."""
    side = max(8, int((size / 3) ** 0.5))
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(samples)
    return {f"p{p}": ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in (50, 95, 99)}


def form(image: bytes, n: int) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("metadata", json.dumps({"display_name": f"bench {n}"}), content_type="application/json")
    data.add_field("image", image, filename="a.png", content_type="image/png")
    return data


async def _one(session: aiohttp.ClientSession, method: str, url: str, image: bytes | None, n: int) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with session.request(method, url, data=None if image is None else form(image, n)) as response:
            await response.read()
            status = response.status
    except aiohttp.ClientError:
        status = 0
    return status, (time.perf_counter() - started) * 1000


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    image = payload(args.image_bytes, seed=os.getpid()) if args.method == "PUT" else None
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    gate = asyncio.Semaphore(args.clients)
    connector = aiohttp.TCPConnector(limit=args.clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(n: int, session: aiohttp.ClientSession) -> None:
        async with gate:
            status, ms = await _one(session, args.method, args.url.format(user=f"u{n % args.users}"), image, n)
        statuses[status] += 1
        if 200 <= status < 300:
            latencies.append(ms)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        if args.rate:
            tasks = []
            for n in range(int(args.rate * args.duration)):
                await asyncio.sleep(max(0.0, started + n / args.rate - time.perf_counter()))
                tasks.append(asyncio.create_task(one(n, session)))
            await asyncio.gather(*tasks)
        else:
            await asyncio.gather(*(one(n, session) for n in range(args.count)))
        seconds = time.perf_counter() - started
    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return {
        "ok": ok,
        "total": sum(statuses.values()),
        "seconds": seconds,
        "rate": ok / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "latency_ms": percentiles(latencies),
        "bytes": ok * (len(image) if image else 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=["PUT", "GET"])
    parser.add_argument("url", help="may contain {user}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--image-bytes", type=int, default=64 * 1024)
    parser.add_argument("--rate", type=float, default=0.0, help="paced requests per second instead of a count")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=1, help="repetitions, one result each")
    args = parser.parse_args()
    print(json.dumps([asyncio.run(drive(args)) for _ in range(args.reps)]))


if __name__ == "__main__":
    main()

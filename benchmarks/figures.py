"""Each figure of the benchmark, measured side by side with the reference that bounds it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import math
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import payload
from benchmarks.stack import Stack, processes, run_json, stop, wait_http
from service.core import repository
from service.core.notifications import FINISHED_CHANNEL
from service.core.settings import ImageDelivery
from service.core.variants import DEFAULT_VARIANTS, VariantFormat, VariantSpec, parse_variants
from service.dev.embedded import free_port
from workers.outbox import ScanStart

CLIENTS = 32
# The most reads of image bytes per measurement (the profile reads take Profile.reads).
IMAGE_READS = 1000
WORKER_CONCURRENCY = 16
WORKERS = 2
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    ingest: int
    drain: int
    reads: int
    e2e_seconds: float
    outage_seconds: float
    finished_rows: tuple[int, int]
    backlogs: tuple[int, int]
    memory_clients: int
    memory_image_bytes: int
    memory_budget: int


PROFILES = {
    "tiny": Profile("tiny", 2, 40, 40, 80, 1.0, 1.0, (100, 2_000), (50, 200), 8, 1 << 20, 4 << 20),
    "quick": Profile("quick", 3, 200, 200, 400, 1.5, 2.0, (1_000, 20_000), (500, 2_500), 64, 5 << 20, 64 << 20),
    "full": Profile(
        "full", 3, 2000, 2000, 5000, 10.0, 10.0, (1_000, 1_000_000), (1_000, 100_000), 64, 5 << 20, 64 << 20
    ),
}


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def repeat(reps: int, measure: Callable[[], float]) -> dict[str, Any]:
    return summary([measure() for _ in range(reps)])


def repeat_in_turn(reps: int, stacks: list[Stack], measure: Callable[[Stack], float]) -> list[dict[str, Any]]:
    """`measure` in each of `stacks` in turn, the order reversed every repetition: a pair of states
    compared this way shares the machine's load, where measured a minute apart their ratio moved by
    half on this shared VM with the work (buffers per statement) unchanged."""
    samples: list[list[float]] = [[] for _ in stacks]
    for rep in range(reps):
        order = list(enumerate(stacks)) if rep % 2 == 0 else list(enumerate(stacks))[::-1]
        for k, stack in order:
            samples[k].append(measure(stack))
    return [summary(each) for each in samples]


def figure(
    title: str,
    unit: str,
    ours: dict[str, Any],
    references: dict[str, dict[str, Any]],
    bound: str,
    goal: float,
    *,
    lower_is_better: bool = False,
) -> dict[str, Any]:
    reference = references[bound]["median"]
    ratio = ours["median"] / reference if reference else 0.0
    met = ratio <= goal if lower_is_better else ratio >= goal
    return {
        "title": title,
        "unit": unit,
        "ours": ours,
        "references": references,
        "bound": bound,
        "ratio": ratio,
        "goal": f"{'<=' if lower_is_better else '>='} {goal} x {bound}",
        "met": met,
    }


# --- database helpers -------------------------------------------------------------------------

# The sessions of this database's fleet that wait for notifications (another database's may run beside it).
LISTENING = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()"

SEED_PENDING = """
WITH u AS (SELECT 'u' || g AS user_id FROM generate_series(0, $1 - 1) AS g),
p AS (INSERT INTO profiles (user_id, newest_version) SELECT user_id, 1 FROM u),
v AS (INSERT INTO versions (user_id, version, kind, state, metadata, blob_key, sha256, size, content_type,
                            width, height)
      SELECT user_id, 1, 'put', 'pending', '{"display_name": "bench"}', 'images/' || md5(random()::text || user_id),
             $2, $3, 'image/png', 8, 8 FROM u
      RETURNING user_id, blob_key),
-- The variants named by $5 (names) and $6 (boxes), with their keys, as accept_put records them.
k AS (SELECT v.user_id, x.name, x.box, 'images/' || md5(random()::text || v.user_id || x.name) AS blob_key
      FROM v, unnest($5::text[], $6::integer[]) AS x(name, box)),
w AS (INSERT INTO version_variants (user_id, version, name, box, blob_key, content_type)
      SELECT user_id, 1, name, box, blob_key, $7 FROM k),
-- Each intent due at a time of its own, as writes accepted one by one are (the transaction's now()
-- would make a whole backlog due at one instant, and a worker's scan resumes at an instant).
i AS (INSERT INTO intents (user_id, version, max_attempts, blob_key, variant_keys, next_attempt_at)
      SELECT v.user_id, 1, 10, v.blob_key,
             (SELECT coalesce(jsonb_object_agg(k.name, k.blob_key), '{}') FROM k WHERE k.user_id = v.user_id),
             clock_timestamp()
      FROM v
      RETURNING id),
s AS (INSERT INTO staged_images (intent_id, data) SELECT id, $4 FROM i)
SELECT pg_notify('profiles_intents', '')
"""
# Read after the seeding's statement and before its commit: no worker can finish one of these
# earlier, and the inserts are not timed with the drain (a statement reads clock_timestamp() in its
# main query before its WITH clauses' inserts run, and those grow with the tables: 39-62 ms at
# 1,000 finished intents, 84-187 ms at 1,000,000). Read after the commit, a fleet could drain a
# small backlog before the clock is read.
CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"
# The image every write carries (ingest, drains, reads), and PgQueuer's jobs in the same figures.
IMAGE_BYTES = 64 * 1024
# Growth is about the queue, not the disk: 64 KiB staged images would make a 100,000 backlog 6.4 GB
# of TOAST and WAL, and the figure would measure how fast this VM writes and reads that.
GROWTH_IMAGE_BYTES = 1024
RELEASE_CLAIMS = """
UPDATE intents SET state = 'pending', attempts = 0, lease_token = NULL, lease_owner = NULL, next_attempt_at = now()
WHERE lease_owner = 'bench'
"""
CLEAR_BACKLOG = (
    "UPDATE profiles SET live_version = NULL WHERE user_id LIKE 'u%' AND live_version IS NOT NULL",
    "DELETE FROM intents WHERE user_id LIKE 'u%'",
    "DELETE FROM versions WHERE user_id LIKE 'u%'",
    "DELETE FROM profiles WHERE user_id LIKE 'u%'",
    "DELETE FROM blob_deletions",
)
SEED_FINISHED = """
WITH u AS (SELECT 'done' || g AS user_id FROM generate_series($1 + 1, $2) AS g),
p AS (INSERT INTO profiles (user_id, newest_version) SELECT user_id, 1 FROM u),
v AS (INSERT INTO versions (user_id, version, kind, state, metadata, blob_key, sha256, size, content_type,
                            width, height, published_at)
      SELECT user_id, 1, 'put', 'published', '{"display_name": "bench"}', 'images/' || md5(random()::text || user_id),
             'x', 1, 'image/png', 8, 8, now() FROM u
      RETURNING user_id, blob_key)
INSERT INTO intents (user_id, version, max_attempts, state, attempts, blob_key)
SELECT user_id, 1, 10, 'done', 1, blob_key FROM v
"""
UNFINISHED = "SELECT EXISTS (SELECT 1 FROM intents WHERE state IN ('pending', 'in_progress'))"
FINISH_TIMES = """
SELECT extract(epoch FROM updated_at)::float8 FROM intents
WHERE state IN ('done', 'superseded', 'dead') AND updated_at >= to_timestamp($1)
ORDER BY updated_at
LIMIT $2
"""


async def sql(stack: Stack, statement: str, *args: Any, seeding: bool = False) -> Any:
    """One statement on a connection of its own. `seeding` skips triggers, foreign-key checks among
    them: what the benchmark seeds is consistent by construction, and the checks of a million rows
    would take most of the seeding's time."""
    conn = await _connect(stack, seeding=seeding)
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


async def _connect(stack: Stack, *, seeding: bool) -> asyncpg.Connection:
    settings = {"session_replication_role": "replica"} if seeding else None
    conn: asyncpg.Connection = await asyncpg.connect(stack.url(), server_settings=settings)
    return conn


# The variants every write gets by default (PROFILES_VARIANTS unset), for the drain that makes them.
VARIANTS = parse_variants(DEFAULT_VARIANTS)


async def seed_pending(
    stack: Stack, count: int, image_bytes: int = IMAGE_BYTES, *, variants: tuple[VariantSpec, ...] = ()
) -> float:
    """`count` accepted writes of users u0.. in one transaction, each with `variants`; returns the
    database clock just before its commit."""
    data = payload(image_bytes)
    conn = await _connect(stack, seeding=True)
    try:
        async with conn.transaction():
            await conn.execute(
                SEED_PENDING,
                count,
                hashlib.sha256(data).hexdigest(),
                len(data),
                data,
                [spec.name for spec in variants],
                [spec.box for spec in variants],
                VariantFormat.WEBP.content_type,
            )
            committed: float = await conn.fetchval(CLOCK)
    finally:
        await conn.close()
    return committed


async def wait_idle(stack: Stack) -> None:
    """Until no intent is pending or in progress."""
    # The event awaited is a state change made by other processes: poll the database for it.
    while await sql(stack, UNFINISHED):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def drain_times(
    stack: Stack, count: int, finishes: int, image_bytes: int, variants: tuple[VariantSpec, ...]
) -> tuple[float, list[float]]:
    """Seeds `count` writes in one commit while a fleet runs, and waits until `finishes` of them
    have finished: the clock of the commit and their finish times in order (database clock)."""
    conn = await asyncpg.connect(stack.url())
    try:
        seen = 0
        enough = asyncio.Event()

        def finished(*_: object) -> None:
            nonlocal seen
            seen += 1
            if seen >= finishes:
                enough.set()

        # Every finish notifies (delivered at its commit): counting them costs the database nothing,
        # where polling a count of the unfinished ones scans the whole backlog each time.
        await conn.add_listener(FINISHED_CHANNEL, finished)
        committed = await seed_pending(stack, count, image_bytes, variants=variants)
        await enough.wait()
        rows = await conn.fetch(FINISH_TIMES, committed, finishes)
        return committed, [row[0] for row in rows]
    finally:
        await conn.close()


def window_rates(start: float, times: list[float], window: int) -> list[float]:
    """Finishes per second in consecutive windows of `window` finishes, the first from `start`."""
    bounds = [start, *times[window - 1 :: window]]
    return [window / max(end - begin, 1e-6) for begin, end in itertools.pairwise(bounds)]


def worker_settings(stack: Stack, metrics_port: int) -> Any:
    return stack.settings(
        worker_concurrency=WORKER_CONCURRENCY, worker_metrics_host="127.0.0.1", worker_metrics_port=metrics_port
    )


@contextlib.contextmanager
def fleet(stack: Stack, module: str, *args: str) -> Iterator[list[str]]:
    """Two worker processes, started and LISTENing (so a backlog is seen the moment it commits);
    the URLs of their metrics."""
    ports = [free_port() for _ in range(WORKERS)]
    with processes(stack, module, *args, settings=[worker_settings(stack, port) for port in ports]):
        while asyncio.run(sql(stack, LISTENING)) < WORKERS:
            time.sleep(0.05)
        yield [f"http://127.0.0.1:{port}/metrics" for port in ports]


def drain_rates(
    stack: Stack,
    count: int,
    *,
    window: int | None = None,
    windows: int = 1,
    keep_finished: bool = False,
    image_bytes: int = IMAGE_BYTES,
    variants: tuple[VariantSpec, ...] = (),
) -> list[float]:
    """The running fleet drains a backlog of `count` that appears at once, in one commit: its rate
    from the commit to the last finish; or, with a `window`, the rates of the first `windows`
    windows of that many finishes (the rest of the backlog is left as it is). With `keep_finished`
    the finished intents seeded before stay in the tables."""
    asyncio.run(clear_backlog(stack) if keep_finished else stack.reset())
    window = window or count
    committed, times = asyncio.run(drain_times(stack, count, window * windows, image_bytes, variants))
    return window_rates(committed, times, window)


def drain_rate(stack: Stack, count: int, **options: Any) -> float:
    (rate,) = drain_rates(stack, count, **options)
    return rate


def fleet_drain(stack: Stack, p: Profile, module: str, *args: str, count: int, **options: Any) -> dict[str, Any]:
    with fleet(stack, module, *args):
        return repeat(p.reps, lambda: drain_rate(stack, count, **options))


async def seed_finished(stack: Stack, start: int, end: int) -> None:
    """Finished intents of users done<start+1>..done<end>."""
    await sql(stack, SEED_FINISHED, start, end, seeding=True)
    await sql(stack, "VACUUM ANALYZE")


async def clear_backlog(stack: Stack) -> None:
    """Remove what seed_pending added (users u0..), keeping the finished intents of seed_finished:
    seeding a million of those takes most of a minute, so it happens once per run."""
    conn = await asyncpg.connect(stack.url())
    try:
        async with conn.transaction():
            for statement in CLEAR_BACKLOG:
                await conn.execute(statement)
    finally:
        await conn.close()


def load(url: str, method: str, *args: str, reps: int = 1) -> list[dict[str, Any]]:
    """Repetitions of one load, from one driver process (its start-up is paid once)."""
    results: list[dict[str, Any]] = run_json("benchmarks.load", method, url, *args, "--reps", str(reps))
    return results


def reference(*args: str, env: dict[str, str], reps: int = 1) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = run_json("benchmarks.references", *args, "--reps", str(reps), env=env)
    return results


def rates(results: list[dict[str, Any]], scale: float = 1.0) -> dict[str, Any]:
    return summary([float(result["rate"]) * scale for result in results])


def app_process(stack: Stack, kind: str) -> tuple[Any, str]:
    if kind == "ours":
        return stack.api()
    port = free_port()
    proc = stack.spawn("benchmarks.references", kind, "--port", str(port), "--bucket", "profiles")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return proc, url


def in_parallel(jobs: list[Callable[[], T]]) -> list[T]:
    """Every job in a thread of its own, all at once; their results in order."""
    results: dict[int, T] = {}

    def run(i: int) -> None:
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[i] for i in range(len(jobs))]


# --- figures ----------------------------------------------------------------------------------


def ingest(stack: Stack, p: Profile) -> dict[str, Any]:
    put = ("--clients", str(CLIENTS), "--count", str(p.ingest))
    measured: dict[str, dict[str, Any]] = {}
    for kind in ("ours", "minimal-app"):
        proc, url = app_process(stack, kind)
        try:
            asyncio.run(stack.reset())
            measured[kind] = rates(load(url + "/v1/profiles/{user}", "PUT", *put, reps=p.reps))
        finally:
            stop(proc)
    env = stack.env(stack.settings())
    raw = rates(reference("insert", *put, env=env, reps=p.reps))
    return figure(
        "Ingest (64 KiB PNG, 32 clients)",
        "PUT/s",
        measured["ours"],
        {"minimal_aiohttp": measured["minimal-app"], "raw_asyncpg": raw},
        "minimal_aiohttp",
        0.9,
    )


def elapsed(results: list[dict[str, Any]]) -> float:
    """Seconds from the first start to the last end of processes that timed themselves."""
    seconds: float = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return seconds


def s3_put_rate(stack: Stack, count: int) -> float:
    """Raw PutObject from two processes at the workers' total concurrency, timed inside them."""
    env = stack.env(stack.settings())
    args = ("s3-put", "--clients", str(WORKER_CONCURRENCY), "--count", str(count // WORKERS), "--bucket", "profiles")
    results = [runs[0] for runs in in_parallel([lambda: reference(*args, env=env)] * WORKERS)]
    ok: int = sum(r["ok"] for r in results)
    return ok / elapsed(results)


def drain(stack: Stack, p: Profile) -> list[dict[str, Any]]:
    """The drain of writes without variants against raw PutObject, and of writes with the default
    variants against that first drain: what making and uploading them costs."""
    with fleet(stack, "service.cli", "worker"):
        plain = repeat(p.reps, lambda: drain_rate(stack, p.drain))
        # An eighth of the backlog: the drain with variants is several times slower.
        varied = repeat(p.reps, lambda: drain_rate(stack, max(p.drain // 8, 40), variants=VARIANTS))
    raw = repeat(p.reps, lambda: s3_put_rate(stack, p.drain))
    names = ", ".join(spec.name for spec in VARIANTS)
    # Fleet time per intent, shared out over the variants: what each variant adds.
    per_variant_ms = (1 / varied["median"] - 1 / plain["median"]) / len(VARIANTS) * 1000
    return [
        figure("Drain (2 worker processes)", "intents/s", plain, {"raw_s3_put": raw}, "raw_s3_put", 0.9),
        figure(
            f"Drain with the default variants ({names}): {per_variant_ms:.1f} ms of fleet time per variant",
            "intents/s",
            varied,
            {"no_variants": plain},
            "no_variants",
            0.5,
        ),
    ]


PGQUEUER_FINISH_TIMES = """
SELECT extract(epoch FROM created)::float8 FROM pgqueuer_log
WHERE status = 'successful' AND created >= to_timestamp($1)
ORDER BY created
LIMIT $2
"""


def pgqueuer_rates(
    stack: Stack, count: int, payload_bytes: int, *, window: int | None = None, windows: int = 1
) -> list[float]:
    """PgQueuer drains a queue of `count` jobs of `payload_bytes` each from two processes: its rate
    over the whole queue (process clocks, as its own benchmark does); or, with a `window`, the rates
    of the first `windows` windows of that many finishes (database clock, from the drainers' start)."""
    env = stack.env(stack.settings())
    run_json("benchmarks.queues", "pgqueuer-install", env=env)
    enqueue = ("--jobs", str(count), "--payload-bytes", str(payload_bytes))
    run_json("benchmarks.queues", "pgqueuer-enqueue", *enqueue, env=env)
    limit = "0" if window is None else str(math.ceil(window * windows / WORKERS))
    drain = ("benchmarks.queues", "pgqueuer-drain", "--limit", limit)
    results = in_parallel([lambda: run_json(*drain, env=env)] * WORKERS)
    if window is None:
        done: int = sum(result["done"] for result in results)
        return [done / elapsed(results)]
    started = min(result["started"] for result in results)
    times = asyncio.run(_fetch_floats(stack, PGQUEUER_FINISH_TIMES, started, window * windows))
    return window_rates(started, times, window)


async def _fetch_floats(stack: Stack, statement: str, *args: Any) -> list[float]:
    conn = await asyncpg.connect(stack.url())
    try:
        return [row[0] for row in await conn.fetch(statement, *args)]
    finally:
        await conn.close()


def machinery(stack: Stack, p: Profile) -> dict[str, Any]:
    ours = fleet_drain(stack, p, "benchmarks.queues", "noop-worker", count=p.drain)
    pgq = repeat(p.reps, lambda: pgqueuer_rates(stack, p.drain, IMAGE_BYTES)[0])
    return figure(
        "Outbox machinery alone (no-op blob store)", "intents/s", ours, {"pgqueuer_drain": pgq}, "pgqueuer_drain", 1.5
    )


def reads(stack: Stack, p: Profile) -> list[dict[str, Any]]:
    users = min(p.reads, 500)
    with fleet(stack, "service.cli", "worker"):
        # The thumb variant only: the reads read that one, and the others would cost the seeding most of its time.
        drain_rate(stack, users, variants=VARIANTS[:1])
    keys = asyncio.run(_published_keys(stack))
    thumbs = asyncio.run(_published_keys(stack, variant="thumb"))
    get = ("--clients", str(CLIENTS), "--count", str(p.reads), "--users", str(users))
    # Image bytes go through S3 at a tenth of the profile reads' rate: fewer of them give as steady a rate.
    get_bytes = ("--clients", str(CLIENTS), "--count", str(min(p.reads, IMAGE_READS)), "--users", str(users))
    env = stack.env(stack.settings())
    ours, ours_url = app_process(stack, "ours")
    minimal, minimal_url = app_process(stack, "minimal-app")
    redirecting, redirecting_url = stack.api(stack.settings(image_delivery=ImageDelivery.REDIRECT))
    # Every read from S3, as the first read of each image is: what the proxy itself costs.
    uncached, uncached_url = stack.api(stack.settings(image_cache_bytes=0))
    try:
        ours_get = rates(load(ours_url + "/v1/profiles/{user}", "GET", *get, reps=p.reps))
        minimal_get = rates(load(minimal_url + "/v1/profiles/{user}", "GET", *get, reps=p.reps))
        image_mb = len(payload(IMAGE_BYTES)) / 1e6
        ours_bytes = rates(load(ours_url + "/v1/profiles/{user}/image", "GET", *get_bytes, reps=p.reps), image_mb)
        uncached_bytes = rates(
            load(uncached_url + "/v1/profiles/{user}/image", "GET", *get_bytes, reps=p.reps), image_mb
        )
        # The driver follows the redirect, as a browser does: the API's answer, then the bytes from S3.
        redirected_bytes = rates(
            load(redirecting_url + "/v1/profiles/{user}/image", "GET", *get_bytes, reps=p.reps), image_mb
        )
        raw_bytes = summary(
            [
                float(r["bytes"]) / float(r["seconds"]) / 1e6
                for r in reference(
                    "s3-get", *get_bytes[:4], "--bucket", "profiles", "--keys", json.dumps(keys), env=env, reps=p.reps
                )
            ]
        )
        ours_thumb = rates(load(ours_url + "/v1/profiles/{user}/image?variant=thumb", "GET", *get_bytes, reps=p.reps))
        raw_thumb = rates(
            reference(
                "s3-get", *get_bytes[:4], "--bucket", "profiles", "--keys", json.dumps(thumbs), env=env, reps=p.reps
            )
        )
    finally:
        stop(ours)
        stop(minimal)
        stop(redirecting)
        stop(uncached)
    return [
        figure(
            "Reads: GET /v1/profiles/{id}", "GET/s", ours_get, {"minimal_aiohttp": minimal_get}, "minimal_aiohttp", 0.9
        ),
        figure("Reads: live image bytes", "MB/s", ours_bytes, {"raw_s3_get": raw_bytes}, "raw_s3_get", 0.9),
        figure(
            "Reads: live image bytes, image cache off (every read from S3)",
            "MB/s",
            uncached_bytes,
            {"raw_s3_get": raw_bytes},
            "raw_s3_get",
            0.9,
        ),
        figure(
            "Reads: live image bytes, redirect delivery (client follows the 307)",
            "MB/s",
            redirected_bytes,
            {"raw_s3_get": raw_bytes},
            "raw_s3_get",
            0.95,
        ),
        figure("Reads: live thumb variant", "GET/s", ours_thumb, {"raw_s3_get": raw_thumb}, "raw_s3_get", 0.9),
    ]


async def _published_keys(stack: Stack, *, variant: str | None = None) -> list[str]:
    """The keys of the published versions' images, or of their `variant`."""
    conn = await asyncpg.connect(stack.url())
    try:
        if variant is not None:
            rows = await conn.fetch("SELECT blob_key FROM version_variants WHERE verified AND name = $1", variant)
        else:
            rows = await conn.fetch("SELECT blob_key FROM versions WHERE state = 'published'")
        return [row["blob_key"] for row in rows]
    finally:
        await conn.close()


def end_to_end(stack: Stack, p: Profile, drain_median: float) -> dict[str, Any]:
    """Accepted-to-live latency (database clock: version created_at to published_at) at half the
    measured drain rate, with two workers running; and where it goes, from the workers' histograms."""
    rate = max(1.0, drain_median / 2)
    percentile_samples: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
    cpu_busy: list[float] = []
    # Writes without variants, like the drain whose rate paces them (the variants' cost is its own figure).
    api, url = stack.api(stack.settings(variants=()))
    try:
        with fleet(stack, "service.cli", "worker") as worker_metrics:
            for _ in range(p.reps):
                asyncio.run(stack.reset())
                psutil.cpu_percent()
                load(
                    url + "/v1/profiles/{user}",
                    "PUT",
                    "--rate",
                    str(rate),
                    "--duration",
                    str(p.e2e_seconds),
                    "--users",
                    "100000",
                )
                cpu_busy.append(psutil.cpu_percent())
                asyncio.run(wait_idle(stack))
                for name, value in _percentiles(asyncio.run(_publish_latencies(stack))).items():
                    percentile_samples[name].append(value)
            stages = stage_percentiles(worker_metrics)
    finally:
        stop(api)
    ours = {name: summary(samples) for name, samples in percentile_samples.items()}
    goals = {"p50": 15.0, "p99": 100.0}
    return {
        "title": f"End to end, 202 to live, at {rate:.0f} PUT/s (half the drain rate)",
        "unit": "ms",
        "ours": ours,
        "stages": stages,
        # How busy both cores were while the load ran: the latency is queueing when this is ~100.
        "cpu_busy_percent": summary(cpu_busy),
        "goal": "p50 <= 15 ms, p99 <= 100 ms",
        "met": all(ours[name]["median"] <= limit for name, limit in goals.items()),
    }


# The stages of a write, in order, as the workers measure them (service/core/metrics.py).
STAGES = {
    "profiles_intent_enqueue_to_claim_seconds": "enqueue to claim",
    "profiles_intent_claim_to_start_seconds": "claim to upload start",
    "profiles_upload_seconds": "upload",
    "profiles_publish_seconds": "publish",
}


def stage_percentiles(metrics_urls: list[str]) -> dict[str, dict[str, float]]:
    """p50 and p99 in ms of each stage, summed over the workers' histograms and interpolated within
    a bucket, as Prometheus's histogram_quantile does."""
    cumulative: dict[str, dict[float, float]] = {stage: {} for stage in STAGES.values()}
    for metrics_url in metrics_urls:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name not in STAGES:
                continue
            buckets = cumulative[STAGES[family.name]]
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return {stage: {"p50": _quantile(b, 0.5), "p99": _quantile(b, 0.99)} for stage, b in cumulative.items()}


def _quantile(cumulative: dict[float, float], q: float) -> float:
    rank = q * cumulative.get(math.inf, 0.0)
    lower, below = 0.0, 0.0
    for bound in sorted(cumulative):
        count = cumulative[bound]
        if count >= rank and count > below:
            upper = lower if bound == math.inf else bound
            return 1000 * (lower + (upper - lower) * (rank - below) / (count - below))
        lower, below = bound, count
    return 1000 * lower


async def _publish_latencies(stack: Stack) -> list[float]:
    conn = await asyncpg.connect(stack.url())
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM published_at - created_at)::float8 * 1000 AS ms "
            "FROM versions WHERE state = 'published'"
        )
    finally:
        await conn.close()
    return [row["ms"] for row in rows]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples) or [0.0]
    return {f"p{q}": ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] for q in (50, 95, 99)}


def naive(stack: Stack, p: Profile) -> list[dict[str, Any]]:
    """The naive design (S3 inside the request) against ours: write latency, and the share of writes
    accepted while the S3 server is stopped."""
    # The naive app writes at S3's pace: a thousand writes give its percentiles in a third of the time.
    put = ("--clients", str(CLIENTS), "--count", str(min(p.ingest, 1000)))
    latency: dict[str, dict[str, list[float]]] = {"ours": {"p50": [], "p99": []}, "naive-app": {"p50": [], "p99": []}}
    accepted: dict[str, list[float]] = {"ours": [], "naive-app": []}
    apps = {kind: app_process(stack, kind) for kind in ("ours", "naive-app")}
    try:
        for kind, (_, url) in apps.items():
            for result in load(url + "/v1/profiles/{user}", "PUT", *put, reps=p.reps):
                for name in ("p50", "p99"):
                    latency[kind][name].append(result["latency_ms"][name])
        # One outage, measured in `reps` separate windows: a SeaweedFS restart costs seconds.
        stack.s3.kill()
        try:
            during = in_parallel(
                [
                    functools.partial(
                        load,
                        url + "/v1/profiles/{user}",
                        "PUT",
                        "--rate",
                        "20",
                        "--duration",
                        str(p.outage_seconds),
                        reps=p.reps,
                    )
                    for _, url in apps.values()
                ]
            )
        finally:
            stack.s3.start()
        for kind, windows in zip(apps, during, strict=True):
            accepted[kind] = [window["ok"] / max(1, window["total"]) for window in windows]
    finally:
        for proc, _ in apps.values():
            stop(proc)
    return [
        {
            "title": "Write latency, ours (202) vs naive (S3 in the request)",
            "unit": "ms",
            "ours": {name: summary(v) for name, v in latency["ours"].items()},
            "references": {"naive": {name: summary(v) for name, v in latency["naive-app"].items()}},
            "goal": "lower than naive",
            "met": statistics.median(latency["ours"]["p99"]) <= statistics.median(latency["naive-app"]["p99"]),
        },
        {
            "title": f"Writes accepted while S3 is stopped ({p.reps} windows of {p.outage_seconds:.0f} s)",
            "unit": "share",
            "ours": summary(accepted["ours"]),
            "references": {"naive": summary(accepted["naive-app"])},
            "goal": "ours 1.0, naive 0.0",
            "met": statistics.median(accepted["ours"]) == 1.0,
        },
    ]


def claim_latency_ms(stack: Stack, samples: int) -> float:
    """Median time of one claim of 16, each claiming rows nobody claimed before (as a worker does:
    claimed rows keep their lease, and its scan resumes where the last one reached), so every size
    is measured over the same number of claims.
    The claims are released afterwards: the next repetition finds the same backlog."""

    async def measure() -> float:
        pool = await repository.create_pool(stack.url(), min_size=1, max_size=2, timeout=5)
        try:
            timings = []
            scan = ScanStart(restart_seconds=stack.settings().poll_interval_seconds)  # as a worker's
            for _ in range(samples):
                started = time.perf_counter()
                claims = await repository.claim_intents(pool, WORKER_CONCURRENCY, "bench", 600, after=scan.next())
                timings.append((time.perf_counter() - started) * 1000)
                scan.claimed(claims, asked=WORKER_CONCURRENCY)
            await pool.execute(RELEASE_CLAIMS)
            return statistics.median(timings)
        finally:
            await pool.close()

    return asyncio.run(measure())


def _claims(stacks: list[Stack], p: Profile, backlog: int, samples: int) -> list[dict[str, Any]]:
    """Claim latency in each of `stacks` (in turn) over a backlog of `backlog` seeded for it (in
    place of the one before); the backlogs stay."""
    for stack in stacks:
        asyncio.run(clear_backlog(stack))
        asyncio.run(seed_pending(stack, backlog, GROWTH_IMAGE_BYTES))
    return repeat_in_turn(p.reps, stacks, lambda stack: claim_latency_ms(stack, samples))


def _noop_drains(stacks: list[Stack], p: Profile, backlog: int) -> list[dict[str, Any]]:
    """The no-op drain rate of each of `stacks` (in turn), each with a fleet of its own, all running
    throughout (an idle fleet only listens)."""
    with contextlib.ExitStack() as fleets:
        for stack in stacks:
            asyncio.run(clear_backlog(stack))  # the fleet must not start on a backlog seeded before it
            fleets.enter_context(fleet(stack, "benchmarks.queues", "noop-worker"))
        return repeat_in_turn(
            p.reps,
            stacks,
            lambda stack: drain_rate(stack, backlog, keep_finished=True, image_bytes=GROWTH_IMAGE_BYTES),
        )


def growth(stack: Stack, p: Profile) -> list[dict[str, Any]]:
    """Claim latency and the no-op drain rate should depend neither on how many finished rows the
    tables hold nor on how long the backlog is; and with both large, the machinery should still be
    ahead of PgQueuer draining a queue as long in the same database.

    Three states of one database, each growing from the one before: few finished intents and a
    short backlog; many finished and a short backlog; many finished and a long backlog. The first
    two are compared in turn, the first in a copy of the database made before it grew. The long
    backlog is measured in windows of a fifth of it while it drains (it stays long throughout):
    draining all of it, several times over, would not fit the full profile's ten minutes."""
    few, many = p.finished_rows
    short, long = p.backlogs
    samples = max(3, short // WORKER_CONCURRENCY // 2)  # the short backlog never runs dry
    window = long // 5
    asyncio.run(stack.reset())
    asyncio.run(seed_finished(stack, 0, few))
    # The first state stays, in a copy, beside the second: the two are measured in turn.
    states = [stack.twin("few_finished"), stack]
    asyncio.run(seed_finished(stack, few, many))
    small, large = zip(_claims(states, p, short, samples), _noop_drains(states, p, short), strict=True)
    (long_claims,) = _claims([stack], p, long, samples)
    # PgQueuer's queue of its own beside our long backlog and finished intents, in the same database.
    pgq = summary(pgqueuer_rates(stack, long, GROWTH_IMAGE_BYTES, window=window, windows=p.reps))
    asyncio.run(clear_backlog(stack))
    with fleet(stack, "benchmarks.queues", "noop-worker"):
        windowed = drain_rates(
            stack, long, window=window, windows=p.reps, keep_finished=True, image_bytes=GROWTH_IMAGE_BYTES
        )
    ours_long = summary(windowed)
    few_label, many_label = f"{few:,} finished intents", f"{short:,} intents in the backlog"
    windows = f"{p.reps} windows of {window:,} as it drains to {long - p.reps * window:,}"
    return [
        figure(
            f"Claim latency with {many:,} vs {few:,} finished intents",
            "ms",
            large[0],
            {few_label: small[0]},
            few_label,
            1.2,
            lower_is_better=True,
        ),
        figure(
            f"Drain rate with {many:,} vs {few:,} finished intents",
            "intents/s",
            large[1],
            {few_label: small[1]},
            few_label,
            0.9,
        ),
        figure(
            f"Claim latency with {long:,} vs {short:,} intents in the backlog ({many:,} finished in both)",
            "ms",
            long_claims,
            {many_label: large[0]},
            many_label,
            1.2,
            lower_is_better=True,
        ),
        figure(
            f"Drain rate with {long:,} vs {short:,} intents in the backlog ({many:,} finished in both; {windows})",
            "intents/s",
            ours_long,
            {many_label: large[1]},
            many_label,
            0.9,
        ),
        figure(
            f"Outbox machinery with {many:,} finished intents and a {long:,} backlog vs PgQueuer with a "
            f"{long:,} queue in the same database ({windows})",
            "intents/s",
            ours_long,
            {"pgqueuer_drain": pgq},
            "pgqueuer_drain",
            1.5,
        ),
    ]


def memory(stack: Stack, p: Profile) -> dict[str, Any]:
    """Peak RSS of one API process while many clients upload large images at once, next to the
    configured in-flight byte budget; the excess is shed with 503."""
    peaks: list[float] = []
    shed: list[float] = []
    settings = stack.settings(max_inflight_upload_bytes=p.memory_budget, max_image_bytes=2 * p.memory_image_bytes)
    for _ in range(p.reps):
        asyncio.run(stack.reset())
        proc, url = stack.api(settings)
        process = psutil.Process(proc.pid)
        baseline = process.memory_info().rss
        peak = baseline
        done = threading.Event()

        def sample(done: threading.Event = done, process: psutil.Process = process) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            (result,) = load(
                url + "/v1/profiles/{user}",
                "PUT",
                "--clients",
                str(p.memory_clients),
                "--count",
                str(p.memory_clients),
                "--image-bytes",
                str(p.memory_image_bytes),
            )
        finally:
            done.set()
            sampler.join()
            stop(proc)
        peaks.append((peak - baseline) / 2**20)
        shed.append(result["statuses"].get("503", 0) / max(1, result["total"]))
    budget_mib = p.memory_budget / 2**20
    return {
        "title": f"Memory: {p.memory_clients} clients uploading {p.memory_image_bytes >> 20} MiB at once",
        "unit": "MiB above idle RSS",
        "ours": summary(peaks),
        "references": {"budget": summary([budget_mib])},
        "shed_share": summary(shed),
        "goal": "peak growth at most 1.5 times the budget",
        "ratio": statistics.median(peaks) / budget_mib,
        "met": statistics.median(peaks) <= 1.5 * budget_mib,
    }


def machine() -> dict[str, Any]:
    import os
    import platform

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }

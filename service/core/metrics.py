"""Prometheus metrics of the API and the workers, and the /metrics endpoint that serves them.

Queue figures (intents by state, queue lag, GC backlog) are read from PostgreSQL when scraped,
through partial indexes, so they are the same whichever process is scraped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from service.core import repository
from service.core.repository import DATABASE_UNAVAILABLE, Pool

log = logging.getLogger(__name__)

# Fine at the low end: the stages of a write take milliseconds each.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

HTTP_REQUESTS = Counter("profiles_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "profiles_http_request_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS
)

INTENTS = Gauge("profiles_intents", "Unfinished and dead intents by state", ["state"])
QUEUE_LAG = Gauge("profiles_queue_lag_seconds", "How long the oldest due intent has been waiting to be claimed")
ENQUEUE_TO_CLAIM = Histogram(
    "profiles_intent_enqueue_to_claim_seconds", "From acceptance to a worker's claim", buckets=LATENCY_BUCKETS
)
CLAIM_TO_DONE = Histogram(
    "profiles_intent_claim_to_finish_seconds",
    "From claim to the end of the attempt",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
INTENTS_FINISHED = Counter("profiles_intents_finished_total", "Intents finished by this process", ["state"])
RETRIES = Counter("profiles_intent_retries_total", "Failed attempts that will be retried")
PUBLISH_BATCH = Histogram(
    "profiles_publish_batch_intents",
    "Intents published by one fenced statement",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
CLAIM_TO_START = Histogram(
    "profiles_intent_claim_to_start_seconds", "From a claim to the start of its attempt", buckets=LATENCY_BUCKETS
)
UPLOAD_LATENCY = Histogram("profiles_upload_seconds", "Upload and verification of one blob", buckets=LATENCY_BUCKETS)
PUBLISH_LATENCY = Histogram(
    "profiles_publish_seconds",
    "From a finished upload to the answer of its fenced publish, waiting for a batch included",
    buckets=LATENCY_BUCKETS,
)
UPLOAD_BYTES = Counter("profiles_upload_bytes_total", "Bytes uploaded to the blob store")
VARIANT_RENDER = Histogram(
    "profiles_variant_render_seconds",
    "Decoding an image and encoding all its variants, per version",
    buckets=LATENCY_BUCKETS,
)
ADDING_VARIANTS = Gauge(
    "profiles_add_variants_intents", "Unfinished add_variants intents (live versions getting newly configured variants)"
)
VARIANT_WALK = Counter(
    "profiles_variant_walk_versions_total",
    "Live versions the variant walk changed: variants queued to make, or removed",
    ["change"],
)

IMAGE_CACHE = Counter(
    "profiles_image_cache_reads_total",
    "Live image reads answered from the API's memory (hit) or the blob store (miss)",
    ["result"],
)

GC_DELETIONS = Counter("profiles_gc_deletions_total", "Blobs deleted by the collector", ["reason"])
GC_BACKLOG = Gauge("profiles_gc_backlog", "Blob deletions waiting", ["due"])
RECONCILE_FINDINGS = Counter("profiles_reconcile_findings_total", "Unneeded keys found in the bucket", ["kind"])


async def refresh_queue_gauges(pool: Pool, grace_seconds: float) -> None:
    stats = await repository.queue_stats(pool, grace_seconds)
    for state, count in stats.unfinished_and_dead().items():
        INTENTS.labels(state).set(count)
    QUEUE_LAG.set(stats.lag_seconds)
    ADDING_VARIANTS.set(stats.adding_variants)
    GC_BACKLOG.labels("true").set(stats.gc_due)
    GC_BACKLOG.labels("false").set(stats.gc_scheduled - stats.gc_due)


def metrics_handler(pool: Callable[[], Pool], grace_seconds: float) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve_metrics(_request: web.Request) -> web.Response:
        try:
            await refresh_queue_gauges(pool(), grace_seconds)
        except DATABASE_UNAVAILABLE as exc:
            log.warning("queue metrics are stale: %r", exc)
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return serve_metrics


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def http_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
        HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - started)

"""The outbox worker: claims due intents, uploads and verifies their blobs, publishes fenced.

Any number of these run at once on any number of hosts; they coordinate only through PostgreSQL
(SKIP LOCKED claims, leases, lease-token fences), never with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, MutableMapping
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.core import metrics, repository, tracing
from service.core.blobstore import BlobStore, BlobStoreError, open_blob_store
from service.core.domain import IntentPurpose, IntentState, error_text, retry_delay
from service.core.lifecycle import Shutdown
from service.core.notifications import INTENTS_CHANNEL, Listener, due_time
from service.core.repository import ANY_DATABASE_ERROR, FROM_THE_START, Claim, Finished, Pool
from service.core.settings import Settings
from service.core.variants import VariantFailed
from workers.maintenance import run_maintenance
from workers.publisher import Publisher
from workers.variants import VariantMaker, upload_all

log = logging.getLogger(__name__)


class StagedBytesMissing(Exception):
    pass


class OriginalAltered(BlobStoreError):
    """The published original read back is not the bytes its version records."""


class ClaimLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log lines about one claim: each starts with "intent <id> v<n> of <user>:" and carries the
    three as structured fields."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(log, {"intent_id": str(claim.id), "user_id": claim.user_id, "version": claim.version})
        self._prefix = f"intent {claim.id} v{claim.version} of {claim.user_id}: "

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, MutableMapping[str, Any]]:
        return f"{self._prefix}{msg}", {**kwargs, "extra": self.extra}


# How far before the latest due time it claimed, or the due time a notice named, a worker's next scan
# starts: room for clocks read a little apart (a due time is its transaction's start).
RESUME_MARGIN = timedelta(milliseconds=100)


class ScanStart:
    """Where a worker's next claim starts its scan of the due intents: just before the latest due
    time its scans reached, so that it does not walk what every claim before it took (see
    claim_intents). Retries and leases that run out come due ahead of that place and are found in
    order. Behind it a scan goes back to the due time of an intent a notice announced (one that
    committed after the scan passed its place), from the start for a notice that does not say, and
    from the start once every `restart_seconds` (the poll interval) for the rest: intents a scan
    skipped while another transaction held them, notices lost while the listener reconnected, a
    database clock set back. A scan that went back, if it filled every slot, goes on from where it
    reached; one that did not fill them took everything due from where it started."""

    def __init__(self, restart_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._restart_seconds = restart_seconds
        self._clock = clock
        self._reached: datetime | None = None
        self._restarted_at = -math.inf
        # Notices since the last claim began; those it began with, until it succeeds.
        self._back_to: datetime | None = None
        self._unconfirmed: datetime | None = None
        self._restarting: float | None = None
        self._went_back = False

    def next(self) -> datetime:
        """Where the next claim starts; claimed() confirms it (until then it is not done)."""
        now = self._clock()
        back_to = _earliest(self._back_to, self._unconfirmed)
        self._back_to, self._unconfirmed = None, back_to
        start = _earliest(self._reached, back_to) if self._reached is not None else None
        if self.seconds_to_restart() <= 0 or start is None or start - FROM_THE_START <= RESUME_MARGIN:
            self._restarting, self._went_back = now, True
            return FROM_THE_START
        self._restarting, self._went_back = None, start != self._reached
        return start - RESUME_MARGIN

    def seconds_to_restart(self) -> float:
        return self._restarted_at + self._restart_seconds - self._clock()

    def claimed(self, claims: list[Claim], *, asked: int) -> None:
        """The claim that began at next(), for `asked` intents, succeeded."""
        self._unconfirmed = None
        if self._restarting is not None:
            self._restarted_at = self._restarting
        if claims:
            reached = max(claim.scan_reached for claim in claims)
            if self._reached is None or self._went_back or len(claims) < asked:
                self._reached = reached
            else:
                self._reached = max(self._reached, reached)

    def notified(self, payload: str) -> None:
        """A notice on INTENTS_CHANNEL arrived (after its transaction committed)."""
        self._back_to = _earliest(self._back_to, due_time(payload) or FROM_THE_START)


def _earliest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Keeps up to `worker_concurrency` intents in flight; wakes on NOTIFY or every poll interval."""

    def __init__(self, settings: Settings, pool: Pool, blobs: BlobStore, *, name: str | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._blobs = blobs
        self.name = name or worker_name()
        self._running: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._scan = ScanStart(settings.poll_interval_seconds)
        self._claim_failed = False
        self._listener = Listener(settings.database_url, INTENTS_CHANNEL, self._notified)
        self._publisher = Publisher(pool, max_batch=settings.worker_concurrency)
        self._variants = VariantMaker()

    def _notified(self, payload: str) -> None:
        self._scan.notified(payload)
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; what is in flight finishes (each attempt is bounded by its deadline)."""
        if not self._stop.is_set():
            log.info("worker %s stopping: finishing %d intent(s) in flight", self.name, len(self._running))
        self._stop.set()
        self._wake.set()

    def abort(self) -> None:
        """Give back what is in flight at once (a second signal)."""
        self.stop()
        for task in self._running:
            task.cancel()
        self._publisher.abort()

    async def run(self) -> None:
        log.info("worker %s started (concurrency %d)", self.name, self._settings.worker_concurrency)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                if not await self._claim_more():
                    await self._idle()
        finally:
            if self._running:
                await asyncio.wait(self._running)
            await self._listener.close()
            log.info("worker %s stopped", self.name)

    async def _idle(self) -> None:
        # Until the next scan from the start is due at the latest: an intent behind where the scans
        # reached waits at most a poll interval. A whole interval after a failed claim, or with every
        # slot taken (a task's end wakes it), or the loop would claim, or find no slot, at once again.
        wait = self._settings.poll_interval_seconds
        if not self._claim_failed and len(self._running) < self._settings.worker_concurrency:
            wait = min(wait, max(self._scan.seconds_to_restart(), 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait)

    async def _claim_more(self) -> bool:
        """Claim as many intents as there are free slots; True if it is worth claiming again now."""
        free = self._settings.worker_concurrency - len(self._running)
        if free <= 0:
            return False
        await self._listener.ensure()
        try:
            claims = await repository.claim_intents(
                self._pool, free, self.name, self._settings.lease_seconds, after=self._scan.next()
            )
        except ANY_DATABASE_ERROR as exc:
            # Whatever went wrong, the loop goes on: unclaimed intents wait, claimed ones have leases.
            log.warning("cannot claim intents: %r", exc)
            self._claim_failed = True
            return False
        self._claim_failed = False
        self._scan.claimed(claims, asked=free)
        claimed = time.perf_counter()
        for claim in claims:
            task = asyncio.create_task(self._start(claim, claimed))
            self._running.add(task)
            task.add_done_callback(self._done)
        return len(claims) == free

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _start(self, claim: Claim, claimed: float) -> None:
        metrics.CLAIM_TO_START.observe(time.perf_counter() - claimed)
        await self.process(claim)

    async def process(self, claim: Claim) -> None:
        """One attempt at a claimed intent, under its deadline; failures are recorded for a retry.

        Its span starts a trace of its own, linked (not parented) to the request that accepted the
        intent and to the one that replayed it, if any: the request ended long before."""
        if claim.attempts == 1:
            metrics.ENQUEUE_TO_CLAIM.observe(claim.queued_seconds)
        about = ClaimLog(claim)
        started = time.perf_counter()
        with tracing.tracer().start_as_current_span(
            "process intent",
            kind=SpanKind.CONSUMER,
            links=tracing.links_to(accepted=claim.traceparent, replayed=claim.replay_traceparent),
            attributes={
                "profiles.intent_id": str(claim.id),
                "profiles.user_id": claim.user_id,
                "profiles.version": claim.version,
                "profiles.attempt": claim.attempts,
            },
        ) as span:
            try:
                async with asyncio.timeout(self._settings.attempt_deadline_seconds):
                    state = await self._attempt(claim)
            except asyncio.CancelledError:
                await asyncio.shield(self._release(claim, about))
                raise
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                outcome = await self._fail(claim, exc, about)
            else:
                outcome = self._finished(claim, state, about)
            span.set_attribute("profiles.outcome", outcome)
        metrics.CLAIM_TO_DONE.labels(outcome).observe(time.perf_counter() - started)

    def _finished(self, claim: Claim, state: IntentState | None, about: ClaimLog) -> str:
        if state is None:
            about.warning("lease lost, result discarded")
            return "lease_lost"
        metrics.INTENTS_FINISHED.labels(state.value).inc()
        about.info("%s (attempt %d)", state.value, claim.attempts)
        return state.value

    async def _attempt(self, claim: Claim) -> IntentState | None:
        if claim.purpose is IntentPurpose.ADD_VARIANTS:
            return await self._add_variants(claim)
        # A version older than the live one can never go live: no need to make or upload anything.
        if claim.already_superseded:
            with metrics.PUBLISH_LATENCY.time():
                return await self._publisher.publish(Finished(claim))
        if claim.data is None:
            raise StagedBytesMissing(f"no staged bytes for intent {claim.id}")
        made = await self._variants.make(claim, claim.data)
        await upload_all(self._blobs, claim, made, original=claim.data)
        with metrics.PUBLISH_LATENCY.time():
            return await self._publisher.publish(Finished(claim, made))

    async def _add_variants(self, claim: Claim) -> IntentState | None:
        """Variants configured after the version went live, made from its published original (its
        staged bytes are gone) and attached by a fenced statement while it is still live. One
        no longer live, or left with nothing to make (a later walk re-keyed its variants), reads
        nothing and only finishes."""
        if claim.live_version != claim.version or not claim.variants:
            return await repository.attach_variants(self._pool, Finished(claim))
        original = await self._blobs.read(claim.blob_key)
        if (await asyncio.to_thread(hashlib.sha256, original)).hexdigest() != claim.sha256:
            raise OriginalAltered(f"{claim.blob_key} does not hold the bytes of v{claim.version} (sha256 differs)")
        made = await self._variants.make(claim, original)
        await upload_all(self._blobs, claim, made)
        return await repository.attach_variants(self._pool, Finished(claim, made))

    async def _fail(self, claim: Claim, exc: Exception, about: ClaimLog) -> str:
        """Record a failed attempt (a retry after back-off, or death); returns the outcome."""
        error = error_text(exc, context=f"attempt {claim.attempts}: ")
        delay = retry_delay(claim.attempts, self._settings.retry_base_seconds, self._settings.retry_max_seconds)
        try:
            state = await repository.fail_attempt(self._pool, claim, delay, error, final=isinstance(exc, VariantFailed))
        except ANY_DATABASE_ERROR as db_exc:
            about.warning("cannot record failure (%r); its lease will expire", db_exc)
            return "unrecorded"
        if state is None:
            about.warning("lease lost, failure discarded: %s", error)
            return "lease_lost"
        if state is IntentState.DEAD:
            metrics.INTENTS_FINISHED.labels(state.value).inc()
            about.error("%s, dead", error)
            return state.value
        metrics.RETRIES.inc()
        about.warning("%s, retry in %.1fs", error, delay)
        return "retry"

    async def _release(self, claim: Claim, about: ClaimLog) -> None:
        try:
            await repository.release_intent(self._pool, claim)
        except ANY_DATABASE_ERROR as exc:
            about.warning("not released (%r); its lease will expire", exc)
            return
        about.info("released")


async def run_worker(settings: Settings, shutdown: Shutdown, ready: asyncio.Event | None = None) -> None:
    """One worker process until the graceful phase of `shutdown`; its immediate phase gives
    in-flight work back at once. `ready` is set once its metrics port listens.

    Beside the outbox it runs the maintenance jobs (garbage collection, pruning, reconciliation)
    and serves its metrics on PROFILES_WORKER_METRICS_PORT.
    """
    pool = await repository.create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.worker_concurrency + 4,
        timeout=settings.db_acquire_timeout_seconds,
    )
    metrics_site = await _serve_metrics(settings, pool)
    if ready is not None:
        ready.set()
    try:
        async with open_blob_store(settings) as blobs:
            worker = Worker(settings, pool, blobs)
            maintenance = asyncio.create_task(run_maintenance(settings, pool, blobs, worker.name))
            running = asyncio.create_task(worker.run())
            await _stop_on(shutdown, worker, running)
            await running
            # Maintenance jobs are idempotent and leased: interrupting one loses nothing.
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
    finally:
        if metrics_site is not None:
            await metrics_site.cleanup()
        await pool.close()


async def _serve_metrics(settings: Settings, pool: Pool) -> web.AppRunner | None:
    if not settings.worker_metrics_port:
        return None
    app = web.Application()
    app.router.add_get("/metrics", metrics.metrics_handler(lambda: pool, settings.gc_grace_seconds))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.worker_metrics_host, settings.worker_metrics_port).start()
    except OSError as exc:
        # Metrics are not worth refusing to work over: say so and carry on.
        log.warning("metrics port %d unavailable (%s); serving no metrics", settings.worker_metrics_port, exc)
        await runner.cleanup()
        return None
    return runner


async def _stop_on(shutdown: Shutdown, worker: Worker, running: asyncio.Task[None]) -> None:
    if await _first(shutdown.graceful, running):
        worker.stop()
        if await _first(shutdown.immediate, running):
            worker.abort()


async def _first(event: asyncio.Event, running: asyncio.Task[None]) -> bool:
    """Wait for `event` or the end of `running`; whether `running` is still going."""
    waiting = asyncio.create_task(event.wait())
    await asyncio.wait({waiting, running}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    return not running.done()

"""Garbage collection of unneeded blobs, reconciliation of the bucket against the database, pruning
of finished rows, the console's bulk replays and the variant walk. Leader-free: any number of
workers run them at once, coordinated only through PostgreSQL (SKIP LOCKED leases, one conditional
UPDATE per reconciliation)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.core import metrics, operations, repository
from service.core.blobstore import BlobStore, BlobStoreError
from service.core.domain import DeletionReason, error_text, is_own_blob_key, retry_delay
from service.core.notifications import REPLAY_JOBS_CHANNEL, Listener
from service.core.repository import DeletionClaim, KnownKey, Pool, Pruned
from service.core.settings import Settings
from workers.variant_walk import VariantWalk

log = logging.getLogger(__name__)

# A claimed deletion is retried by another collector if its holder vanishes for this long.
DELETION_LEASE_SECONDS = 60.0
RECONCILE_TASK = "reconcile"
MAX_PRUNE_BATCHES = 20


@dataclass
class GcReport:
    deleted: int = 0
    failed: int = 0


class Collector:
    """Deletes the blobs whose grace period is over, each one by exactly one collector."""

    def __init__(self, settings: Settings, pool: Pool, blobs: BlobStore) -> None:
        self._settings = settings
        self._pool = pool
        self._blobs = blobs

    async def collect_due(self) -> GcReport:
        report = GcReport()
        await repository.sight_blob_deletions(self._pool)
        while claims := await repository.claim_blob_deletions(
            self._pool, self._settings.gc_batch_size, self._settings.gc_grace_seconds, DELETION_LEASE_SECONDS
        ):
            results = await asyncio.gather(*(self._delete(claim) for claim in claims))
            report.deleted += sum(results)
            report.failed += len(results) - sum(results)
            if not all(results):
                break  # the store is failing: leave the rest for the next round
        return report

    async def _delete(self, claim: DeletionClaim) -> bool:
        try:
            await self._blobs.delete(claim.blob_key)
        except BlobStoreError as exc:
            delay = retry_delay(claim.attempts, self._settings.retry_base_seconds, self._settings.retry_max_seconds)
            await repository.fail_blob_deletion(self._pool, claim.blob_key, delay, error_text(exc))
            log.warning("blob %s: delete failed, retry in %.1fs: %s", claim.blob_key, delay, exc)
            return False
        await repository.finish_blob_deletion(self._pool, claim.blob_key)
        metrics.GC_DELETIONS.labels(claim.reason).inc()
        log.info("blob %s deleted (%s)", claim.blob_key, claim.reason)
        return True


@dataclass
class ReconcileReport:
    listed: int = 0
    needed: int = 0
    already_scheduled: int = 0
    # Keys under the prefix that this deployment did not make: left alone, only counted.
    foreign: int = 0
    scheduled: Counter[DeletionReason] = field(default_factory=Counter)
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "listed": self.listed,
            "needed": self.needed,
            "already_scheduled": self.already_scheduled,
            "foreign": self.foreign,
            "scheduled": {reason.value: count for reason, count in self.scheduled.items()},
            "dry_run": self.dry_run,
        }


def _verdict(known: KnownKey) -> DeletionReason | None:
    """None: leave the key alone; otherwise why it should be (re)scheduled for deletion."""
    if known.needed or known.scheduled:
        return None
    return DeletionReason.REAPPEARED if known.known else DeletionReason.STRAY


async def reconcile(settings: Settings, pool: Pool, blobs: BlobStore, *, dry_run: bool = False) -> ReconcileReport:
    """Schedule every key in the bucket that no live or pending version needs and that is not
    scheduled yet. Deletion itself waits for the grace period, counted from when a collector
    first sees the scheduled deletion, so a key younger than the grace period is never deleted."""
    report = ReconcileReport(dry_run=dry_run)
    started_at = datetime.now(UTC)
    async for listed in blobs.key_pages(settings.s3_key_prefix):
        page = [key for key in listed if is_own_blob_key(key, settings.s3_key_prefix)]
        report.listed += len(listed)
        report.foreign += len(listed) - len(page)
        for known in await repository.classify_blob_keys(pool, page):
            verdict = _verdict(known)
            if verdict is None:
                report.needed += known.needed
                report.already_scheduled += not known.needed
                continue
            report.scheduled[verdict] += 1
            metrics.RECONCILE_FINDINGS.labels(verdict).inc()
            if not dry_run:
                await repository.schedule_blob_deletion(pool, known.key, verdict)
                log.info("blob %s scheduled for deletion (%s)", known.key, verdict)
    if not dry_run:
        await repository.record_maintenance_report(pool, RECONCILE_TASK, started_at, report.as_dict())
    return report


async def prune(settings: Settings, pool: Pool) -> dict[str, int]:
    """Delete rows past their retention, a bounded number of small batches per table."""
    retention = {
        Pruned.FINISHED_INTENTS: settings.intent_retention_seconds,
        Pruned.DEAD_INTENTS: settings.dead_retention_seconds,
        Pruned.IDEMPOTENCY_KEYS: settings.idempotency_retention_seconds,
        Pruned.BLOB_DELETIONS: settings.intent_retention_seconds,
        Pruned.REPLAY_JOBS: settings.intent_retention_seconds,
        # An ended console session is of no use to anyone.
        Pruned.CONSOLE_SESSIONS: 0.0,
    }
    pruned: dict[str, int] = {}
    for what in Pruned:
        pruned[what] = 0
        for _ in range(MAX_PRUNE_BATCHES):
            deleted = await repository.prune(pool, what, retention[what], settings.prune_batch_size)
            pruned[what] += deleted
            if deleted < settings.prune_batch_size:
                break
    return pruned


async def _every(interval: float, job: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        try:
            await job()
        except Exception:  # a periodic job must never take the worker down
            log.exception("%s failed, retrying in %.0fs", name, interval)
        await asyncio.sleep(interval)


async def run_replay_jobs(settings: Settings, pool: Pool, owner: str) -> None:
    """Run the bulk replays operators ask for in the console, one at a time, until cancelled; woken
    by their notification, and looking every GC interval anyway (a job whose holder vanished)."""
    wake = asyncio.Event()
    listener = Listener(settings.database_url, REPLAY_JOBS_CHANNEL, lambda _job_id: wake.set())
    try:
        while True:
            await listener.ensure()
            wake.clear()
            try:
                if await operations.run_next_replay_job(pool, settings, owner):
                    continue
            except Exception:  # like the periodic jobs: never take the worker down
                log.exception("replay job failed; its lease expires and a worker takes it again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.gc_interval_seconds)
    finally:
        await listener.close()


async def run_maintenance(settings: Settings, pool: Pool, blobs: BlobStore, owner: str) -> None:
    """The periodic jobs every worker process (`owner`) runs beside its outbox work, until cancelled."""
    collector = Collector(settings, pool, blobs)
    walk = VariantWalk(settings, pool)

    async def maybe_reconcile() -> None:
        if await repository.start_maintenance_run(pool, RECONCILE_TASK, settings.reconcile_interval_seconds):
            report = await reconcile(settings, pool, blobs)
            log.info("reconciliation: %s", report.as_dict())

    async def prune_and_report() -> None:
        pruned = await prune(settings, pool)
        if any(pruned.values()):
            log.info("pruned %s", pruned)

    await asyncio.gather(
        _every(settings.gc_interval_seconds, collector.collect_due, "garbage collection"),
        _every(settings.prune_interval_seconds, prune_and_report, "pruning"),
        _every(settings.gc_interval_seconds, walk.round, "variant walk"),
        _every(min(settings.reconcile_interval_seconds, 60.0), maybe_reconcile, "reconciliation"),
        run_replay_jobs(settings, pool, owner),
    )

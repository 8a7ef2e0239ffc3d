"""What operators do to intents, shared by `profiles intents`, /v1/admin/intents and the console at
/admin/: list, replay (one, or all that match as a background job), and what the console shows."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from service.core import repository, tracing
from service.core.domain import IntentPurpose, IntentState, JobState, Replayable, new_blob_key
from service.core.repository import (
    Connection,
    ConsoleOverview,
    FinishedInMinute,
    IntentFilter,
    IntentStorage,
    JobClaim,
    JobIntent,
    ListedIntent,
    Pool,
    ProfileRow,
    QueueStats,
    ReplayJob,
    ReplayTarget,
    VersionRow,
)
from service.core.settings import Settings

log = logging.getLogger(__name__)

PAGE = 500
# A bulk replay job renews its lease after each batch; a worker that vanishes mid-job leaves it to
# another one after the lease.
JOB_BATCH = 50
JOB_LEASE_SECONDS = 30.0
RATE_MINUTES = 60
RECENT_JOBS = 5
PROFILE_VERSIONS_SHOWN = 50
JOB_INTENTS_SHOWN = 100


class ReplayOutcome(StrEnum):
    REPLAYED = "replayed"
    WOULD_REPLAY = "would_replay"
    ALREADY_PENDING = "already_pending"
    FINISHED = "finished"
    LEASED = "leased"
    NO_STAGED_BYTES = "no_staged_bytes"
    NOT_FOUND = "not_found"

    @property
    def refused(self) -> bool:
        """The intent was not replayed, and a replay cannot change that (a pending one will run anyway)."""
        return self in _REFUSED


_REFUSED = frozenset(
    {ReplayOutcome.NOT_FOUND, ReplayOutcome.LEASED, ReplayOutcome.FINISHED, ReplayOutcome.NO_STAGED_BYTES}
)


def _refusal(target: ReplayTarget | None) -> ReplayOutcome | None:
    """Why an intent cannot be replayed, or None for a dead or stuck (lease expired) one."""
    if target is None:
        return ReplayOutcome.NOT_FOUND
    if target.leased:
        return ReplayOutcome.LEASED
    if target.state == IntentState.PENDING or target.overtaken:
        return ReplayOutcome.ALREADY_PENDING
    if target.state in (IntentState.DONE, IntentState.SUPERSEDED):
        return ReplayOutcome.FINISHED
    # An add_variants intent reads its version's published original: it has no staged bytes.
    if target.purpose is IntentPurpose.PUBLISH and not target.staged:
        return ReplayOutcome.NO_STAGED_BYTES
    return None


async def replay(pool: Pool, settings: Settings, intent_id: uuid.UUID, *, dry_run: bool = False) -> ReplayOutcome:
    """Send a dead or stuck intent round again with a fresh attempt budget. Safe to repeat: a
    replayed intent is pending, and replaying a pending one does nothing."""
    async with pool.acquire() as conn, conn.transaction():
        return await _replay_in(conn, settings, intent_id, dry_run=dry_run)


async def _replay_in(conn: Connection, settings: Settings, intent_id: uuid.UUID, *, dry_run: bool) -> ReplayOutcome:
    """replay() inside the caller's transaction."""
    target = await repository.lock_intent_for_replay(conn, intent_id)
    refusal = _refusal(target)
    if refusal is not None:
        return refusal
    assert target is not None
    if dry_run:
        return ReplayOutcome.WOULD_REPLAY
    if target.state == IntentState.DEAD:
        await _give_fresh_keys(conn, settings, target)
    await repository.replay_intent(conn, intent_id, settings.max_attempts, tracing.current_traceparent())
    return ReplayOutcome.REPLAYED


async def _give_fresh_keys(conn: Connection, settings: Settings, target: ReplayTarget) -> None:
    """A dead intent's keys are never uploaded to again: they were scheduled for deletion when it
    died (a publish intent's, with its failed version) or are now (an add_variants intent's)."""
    fresh = {name: new_blob_key(settings.s3_key_prefix) for name in target.variant_names}
    if target.purpose is IntentPurpose.ADD_VARIANTS:
        await repository.give_fresh_variant_keys(conn, target.id, fresh)
    else:
        await repository.give_fresh_keys(conn, target.id, new_blob_key(settings.s3_key_prefix), fresh)


async def list_intents(
    pool: Pool, where: IntentFilter, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[ListedIntent]:
    """Up to `limit` intents matching `where`, oldest first, after the cursor `after`."""
    return await repository.list_intents(pool, where, limit, after)


async def show_intent(pool: Pool, intent_id: uuid.UUID) -> ListedIntent | None:
    found = await repository.list_intents(pool, IntentFilter(intent_id=intent_id), 1)
    return found[0] if found else None


async def matching(pool: Pool, where: IntentFilter) -> AsyncIterator[ListedIntent]:
    after = None
    while page := await repository.list_intents(pool, where, PAGE, after):
        for intent in page:
            yield intent
        after = (page[-1].created_at, page[-1].id)


async def replayable_ids(pool: Pool, where: IntentFilter) -> list[uuid.UUID]:
    """The dead or stuck intents matching `where`, collected first: replaying changes their state."""
    if where.state not in set(Replayable):
        raise ValueError(f"only {' or '.join(Replayable)} intents can be replayed in bulk")
    return [intent.id async for intent in matching(pool, where)]


async def replay_all(
    pool: Pool,
    settings: Settings,
    ids: list[uuid.UUID],
    *,
    dry_run: bool = False,
    progress: Callable[[uuid.UUID, ReplayOutcome], None] | None = None,
) -> Counter[ReplayOutcome]:
    """Replay each intent in its own transaction, reporting every outcome to `progress`."""
    outcomes: Counter[ReplayOutcome] = Counter()
    for intent_id in ids:
        outcome = await replay(pool, settings, intent_id, dry_run=dry_run)
        outcomes[outcome] += 1
        if progress is not None:
            progress(intent_id, outcome)
    return outcomes


# --- bulk replays as background jobs (asked for in the console, run by the workers) ----------------


class _LeaseLost(Exception):
    """Another worker holds the job now: what this one did in the current transaction is undone."""


class JobTokenReused(Exception):
    """A bulk replay's token sent again with another filter (as an Idempotency-Key with another body)."""


async def submit_replay_job(pool: Pool, token: str, where: IntentFilter, requested_by: str) -> uuid.UUID:
    """The job replaying every intent matching `where` (dead or stuck ones) when a worker starts it;
    the same `token` again finds the same job, and JobTokenReused if it asked for another filter."""
    if where.state not in set(Replayable):
        raise ValueError(f"only {' or '.join(Replayable)} intents can be replayed in bulk")
    job_id, same_filter = await repository.submit_replay_job(pool, token, where, requested_by)
    if not same_filter:
        raise JobTokenReused(f"this form already asked for replay job {job_id}, of another filter")
    return job_id


async def run_next_replay_job(pool: Pool, settings: Settings, owner: str) -> bool:
    """Take the oldest unfinished job whose lease is free and run it to its end (or until its lease
    is lost); False when there was none."""
    job = await repository.claim_replay_job(pool, owner, JOB_LEASE_SECONDS)
    if job is None:
        return False
    if job.state is JobState.QUEUED:
        ids = await replayable_ids(pool, job.filter)
        if not await repository.start_replay_job(pool, job, ids):
            return True
        log.info("replay job %s: %d %s intent(s) to replay", job.id, len(ids), job.selection)
    try:
        while batch := await repository.next_replay_job_intents(pool, job.id, JOB_BATCH):
            for intent_id in batch:
                await _replay_for_job(pool, settings, job, intent_id)
            if not await repository.renew_replay_job(pool, job, JOB_LEASE_SECONDS):
                raise _LeaseLost
    except _LeaseLost:
        log.warning("replay job %s: lease lost, another worker carries on", job.id)
        return True
    await repository.finish_replay_job(pool, job)
    log.info("replay job %s finished", job.id)
    return True


async def _replay_for_job(pool: Pool, settings: Settings, job: JobClaim, intent_id: uuid.UUID) -> None:
    """Replay one intent of `job` and record its outcome in the same transaction: each intent is
    replayed once per job, however often the job changes hands. A refusal (the intent is leased,
    finished, …) is an outcome like any other, reported per intent."""
    async with pool.acquire() as conn, conn.transaction():
        outcome = await _replay_in(conn, settings, intent_id, dry_run=False)
        if not await repository.record_replay_outcome(conn, job, intent_id, outcome):
            raise _LeaseLost


@dataclass(frozen=True)
class JobReport:
    job: ReplayJob
    outcomes: dict[ReplayOutcome, int]
    # The first intents that were not replayed (a refusal), with why.
    refused: list[JobIntent]


async def job_report(pool: Pool, job_id: uuid.UUID) -> JobReport | None:
    found = await repository.list_replay_jobs(pool, job_id, 1)
    if not found:
        return None
    outcomes = {ReplayOutcome(k): v for k, v in (await repository.replay_job_outcomes(pool, job_id)).items()}
    refused = await repository.replay_job_intents_with(pool, job_id, sorted(_REFUSED), JOB_INTENTS_SHOWN)
    return JobReport(found[0], outcomes, refused)


# --- what the console shows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Overview:
    queue: QueueStats
    more: ConsoleOverview
    # Intents finished per minute, oldest minute first, the current one last.
    per_minute: list[FinishedInMinute]
    jobs: list[ReplayJob]


async def overview(pool: Pool, grace_seconds: float) -> Overview:
    counted = {row.minutes_ago: row for row in await repository.finished_per_minute(pool)}
    per_minute = [counted.get(m, FinishedInMinute(m, 0, 0)) for m in reversed(range(RATE_MINUTES))]
    return Overview(
        await repository.queue_stats(pool, grace_seconds),
        await repository.console_overview(pool),
        per_minute,
        await repository.list_replay_jobs(pool, None, RECENT_JOBS),
    )


@dataclass(frozen=True)
class IntentDetail:
    intent: ListedIntent
    storage: IntentStorage


async def intent_detail(pool: Pool, intent_id: uuid.UUID) -> IntentDetail | None:
    intent, storage = await show_intent(pool, intent_id), await repository.intent_storage(pool, intent_id)
    return None if intent is None or storage is None else IntentDetail(intent, storage)


@dataclass(frozen=True)
class ProfileView:
    profile: ProfileRow
    # The newest PROFILE_VERSIONS_SHOWN versions, newest first.
    versions: list[VersionRow]


async def profile_view(pool: Pool, user_id: str) -> ProfileView | None:
    profile = await repository.get_profile_row(pool, user_id)
    if profile is None:
        return None
    return ProfileView(profile, await repository.profile_versions(pool, user_id, PROFILE_VERSIONS_SHOWN))

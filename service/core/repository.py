"""The PostgreSQL adapter: typed functions over the named queries, for the API and the workers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from service.core.domain import STUCK, DeletionReason, IntentPurpose, IntentState, JobState, Replayable, VersionKind
from service.core.images import ImageInfo
from service.core.queries import query
from service.core.variants import Rendered, VariantFormat, VariantSpec

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"

# What "the database cannot do this now, try later" looks like from here: refused or dropped
# connections, a server shutting down or starting, no free connection in time, a read-only
# standby during failover, a deadlock or a serialization failure.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    # Right after the server terminates a pooled connection, asyncpg may hand it out while it is
    # still processing the termination: "cannot switch to state ...; another operation is in progress".
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TransactionRollbackError,
)
# A worker loop survives any of these: unfinished work stays claimable or leased.
ANY_DATABASE_ERROR: tuple[type[BaseException], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)
# No statement of ours runs this long; a half-open connection must not hang a worker for ever.
COMMAND_TIMEOUT_SECONDS = 30.0


async def _keep_session(_conn: Connection) -> None:
    """Pooled sessions hold no state of ours (no SET, no session locks, no LISTEN: listeners have
    their own connections), so releasing one needs no RESET ALL round trip; asyncpg still rolls
    back a transaction left open."""


async def _init_connection(conn: Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int, max_size: int, timeout: float) -> Pool:
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
    )
    return pool


async def connect(dsn: str, *, timeout: float) -> Connection:
    conn: Connection = await asyncpg.connect(dsn, timeout=timeout)
    await _init_connection(conn)
    return conn


@dataclass(frozen=True)
class ProfileHead:
    newest_version: int
    live_version: int | None
    live_is_tombstone: bool

    @property
    def exists(self) -> bool:
        """The one definition, for reads and every precondition: a put is live (what GET shows)."""
        return self.live_version is not None and not self.live_is_tombstone


@dataclass(frozen=True, kw_only=True)
class Accepted:
    """A write recorded with its intent; what an Idempotency-Key replay answers again."""

    intent_id: uuid.UUID
    user_id: str
    version: int
    state: IntentState


@dataclass(frozen=True)
class IdempotencyRecord:
    request_hash: str
    accepted: Accepted


@dataclass(frozen=True, kw_only=True)
class StoredImage:
    """A verified blob: an original image or one of its variants."""

    blob_key: str
    sha256: str
    size: int
    content_type: str
    width: int
    height: int


@dataclass(frozen=True, kw_only=True)
class PublishedVersion(StoredImage):
    """A put that went live at some point, with the image its blob holds and its measured variants
    (tombstones are never read)."""

    user_id: str
    version: int
    metadata: dict[str, Any]
    published_at: datetime
    variants: dict[str, StoredImage]


@dataclass(frozen=True, kw_only=True)
class VariantUpload:
    """A variant a version is to have, and the key the database chose for it (at accept, or replay)."""

    spec: VariantSpec
    format: VariantFormat
    blob_key: str


@dataclass(frozen=True)
class Intent:
    id: uuid.UUID
    user_id: str
    version: int
    kind: VersionKind
    purpose: IntentPurpose
    state: IntentState
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime


@dataclass(frozen=True)
class Claim:
    """One claimed intent: what the worker needs to upload, verify and publish it (or, for an
    add_variants intent, to read the published original and attach the variants it names)."""

    id: uuid.UUID
    user_id: str
    version: int
    purpose: IntentPurpose
    attempts: int
    lease_token: uuid.UUID
    # The latest due time the claim's scan reached (before the claim moved it to the lease's end):
    # the same on every claim one statement made.
    scan_reached: datetime
    queued_seconds: float
    blob_key: str
    sha256: str
    size: int
    content_type: str
    live_version: int | None
    # W3C traceparent of the request that accepted the intent and of the one that last replayed it.
    traceparent: str | None
    replay_traceparent: str | None
    # The staged image (kept out of the repr: log lines and test failures stay short).
    data: bytes | None = field(repr=False)
    variants: tuple[VariantUpload, ...] = ()

    @property
    def already_superseded(self) -> bool:
        return self.live_version is not None and self.live_version >= self.version


def _head(row: asyncpg.Record | None) -> ProfileHead | None:
    if row is None:
        return None
    return ProfileHead(row["newest_version"], row["live_version"], row["deleted"])


async def try_lock_idempotency_key(conn: Connection, user_id: str, key: str) -> bool:
    return bool(await conn.fetchval(query("try_lock_idempotency_key"), user_id, key))


async def get_idempotency_record(conn: Connection, user_id: str, key: str) -> IdempotencyRecord | None:
    row = await conn.fetchrow(query("get_idempotency_record"), user_id, key)
    if row is None:
        return None
    stored = row["accepted"]
    accepted = Accepted(
        intent_id=uuid.UUID(stored["intent_id"]),
        user_id=user_id,
        version=stored["version"],
        state=IntentState(stored["state"]),
    )
    return IdempotencyRecord(row["request_hash"], accepted)


async def save_idempotency_record(conn: Connection, key: str, request_hash: str, accepted: Accepted) -> None:
    stored = {"intent_id": str(accepted.intent_id), "version": accepted.version, "state": accepted.state.value}
    await conn.execute(query("save_idempotency_record"), accepted.user_id, key, request_hash, stored)


async def lock_existing_profile(conn: Connection, user_id: str) -> ProfileHead | None:
    return _head(await conn.fetchrow(query("lock_existing_profile"), user_id))


async def accept_put(
    conn: Connection,
    *,
    user_id: str,
    metadata: dict[str, Any],
    blob_key: str,
    image: ImageInfo,
    data: bytes,
    max_attempts: int,
    traceparent: str | None,
    variants: Sequence[VariantUpload] = (),
) -> tuple[Accepted, ProfileHead]:
    """The write, and the profile's head as it was before it (for the preconditions)."""
    planned = [
        {"name": v.spec.name, "box": v.spec.box, "blob_key": v.blob_key, "content_type": v.format.content_type}
        for v in variants
    ]
    row = await conn.fetchrow(
        query("accept_put"),
        user_id,
        metadata,
        blob_key,
        image.sha256,
        image.size,
        image.content_type,
        image.width,
        image.height,
        max_attempts,
        data,
        planned,
        traceparent,
    )
    assert row is not None
    head = _head(row)
    assert head is not None
    accepted = Accepted(intent_id=row["id"], user_id=user_id, version=row["version"], state=IntentState(row["state"]))
    return accepted, head


async def accept_delete(conn: Connection, user_id: str) -> int:
    version: int = await conn.fetchval(query("accept_delete"), user_id)
    return version


def _version(row: asyncpg.Record | None) -> PublishedVersion | None:
    if row is None:
        return None
    fields = dict(row)
    variants = {item.pop("name"): StoredImage(**item) for item in fields.pop("variants")}
    return PublishedVersion(**fields, variants=variants)


async def get_live_version(conn: Connection | Pool, user_id: str) -> PublishedVersion | None:
    """The live put of `user_id`; None when there is none or a tombstone is live."""
    return _version(await conn.fetchrow(query("get_live_version"), user_id))


async def get_published_version(conn: Connection | Pool, user_id: str, version: int) -> PublishedVersion | None:
    return _version(await conn.fetchrow(query("get_published_version"), user_id, version))


def _intent_fields(row: asyncpg.Record) -> dict[str, Any]:
    return {
        **dict(row),
        "kind": VersionKind(row["kind"]),
        "purpose": IntentPurpose(row["purpose"]),
        "state": IntentState(row["state"]),
    }


async def get_intent(conn: Connection | Pool, intent_id: uuid.UUID) -> Intent | None:
    row = await conn.fetchrow(query("get_intent"), intent_id)
    return None if row is None else Intent(**_intent_fields(row))


# A claim's scan from the start of the due intents.
FROM_THE_START = datetime.min.replace(tzinfo=UTC)


async def claim_intents(
    conn: Connection | Pool, limit: int, owner: str, lease_seconds: float, *, after: datetime = FROM_THE_START
) -> list[Claim]:
    """Up to `limit` due intents, oldest due first, of those due at `after` or later."""
    rows = await conn.fetch(query("claim_intents"), limit, owner, lease_seconds, after)
    return [
        Claim(**{**dict(row), "purpose": IntentPurpose(row["purpose"]), "variants": _variant_uploads(row["variants"])})
        for row in rows
    ]


def _variant_uploads(items: list[dict[str, Any]]) -> tuple[VariantUpload, ...]:
    return tuple(
        VariantUpload(
            spec=VariantSpec(item["name"], item["box"]),
            format=VariantFormat.of_content_type(item["content_type"]),
            blob_key=item["blob_key"],
        )
        for item in items
    )


@dataclass(frozen=True)
class Published:
    """What publish_intents did: the final state of each intent it finished; the intents whose
    profile another transaction held (untouched, to publish on their own). An intent in neither
    lost its lease, and nothing changed for it."""

    states: dict[uuid.UUID, IntentState]
    busy: frozenset[uuid.UUID]


@dataclass(frozen=True)
class Finished:
    """A claim whose uploads are done: the variants it made and uploaded (none if it can only be
    superseded), each to the key its claim named."""

    claim: Claim
    variants: tuple[Rendered, ...] = ()

    def uploaded(self) -> list[dict[str, Any]]:
        keys = {upload.spec.name: upload.blob_key for upload in self.claim.variants}
        return [
            {
                "intent_id": str(self.claim.id),
                "name": made.name,
                "blob_key": keys[made.name],
                "width": made.width,
                "height": made.height,
                "size": len(made.data),
                "sha256": made.sha256,
            }
            for made in self.variants
        ]


async def publish_intents(conn: Connection | Pool, batch: Sequence[Finished]) -> Published:
    """Publish each claimed version (its blob uploaded to claim.blob_key, its variants to theirs) if
    it is newer than the live one, else mark it superseded; all in one statement, at most one claim
    per user."""
    claims = [finished.claim for finished in batch]
    if len({claim.user_id for claim in claims}) != len(claims):
        raise ValueError("a batch holds at most one intent per user")
    rows = await conn.fetch(
        query("publish_intents"),
        [claim.id for claim in claims],
        [claim.lease_token for claim in claims],
        [claim.blob_key for claim in claims],
        [item for finished in batch for item in finished.uploaded()],
    )
    busy = frozenset(row["id"] for row in rows if row["state"] == "busy")
    return Published({row["id"]: IntentState(row["state"]) for row in rows if row["id"] not in busy}, busy)


async def publish_intent(conn: Connection, finished: Finished) -> IntentState | None:
    """Publish one claim, waiting for its profile if another transaction holds it: its final
    state, or None if the lease was lost."""
    async with conn.transaction():
        await lock_existing_profile(conn, finished.claim.user_id)
        return (await publish_intents(conn, [finished])).states.get(finished.claim.id)


async def attach_variants(conn: Connection | Pool, finished: Finished) -> IntentState | None:
    """Finish an add_variants claim: its variants attached if its version is still live (done), else
    nothing (superseded); None if the lease was lost."""
    claim = finished.claim
    state: str | None = await conn.fetchval(query("attach_variants"), claim.id, claim.lease_token, finished.uploaded())
    return None if state is None else IntentState(state)


async def fail_attempt(
    conn: Connection | Pool, claim: Claim, retry_in: float, error: str, *, final: bool = False
) -> IntentState | None:
    """Record a failed attempt: a retry after `retry_in` seconds, or death when no attempt is left
    or the failure is `final` (another attempt would fail the same way)."""
    state: str | None = await conn.fetchval(query("fail_attempt"), claim.id, claim.lease_token, retry_in, error, final)
    return None if state is None else IntentState(state)


async def release_intent(conn: Connection | Pool, claim: Claim) -> None:
    await conn.execute(query("release_intent"), claim.id, claim.lease_token)


async def ping(conn: Connection | Pool) -> None:
    await conn.fetchval(query("ping"))


@dataclass(frozen=True)
class DeletionClaim:
    blob_key: str
    reason: DeletionReason
    attempts: int


async def sight_blob_deletions(conn: Connection | Pool) -> None:
    await conn.execute(query("sight_blob_deletions"))


async def claim_blob_deletions(
    conn: Connection | Pool, limit: int, grace_seconds: float, lease_seconds: float
) -> list[DeletionClaim]:
    rows = await conn.fetch(query("claim_blob_deletions"), limit, grace_seconds, lease_seconds)
    return [DeletionClaim(row["blob_key"], DeletionReason(row["reason"]), row["attempts"]) for row in rows]


async def finish_blob_deletion(conn: Connection | Pool, blob_key: str) -> None:
    await conn.execute(query("finish_blob_deletion"), blob_key)


async def fail_blob_deletion(conn: Connection | Pool, blob_key: str, retry_in: float, error: str) -> None:
    await conn.execute(query("fail_blob_deletion"), blob_key, retry_in, error)


@dataclass(frozen=True, kw_only=True)
class KnownKey:
    """What the database knows of a key found in the bucket."""

    key: str
    needed: bool
    scheduled: bool
    # Whether any version or deletion names it at all.
    known: bool


async def classify_blob_keys(conn: Connection | Pool, keys: list[str]) -> list[KnownKey]:
    rows = await conn.fetch(query("classify_blob_keys"), keys)
    return [KnownKey(**dict(row)) for row in rows]


async def schedule_blob_deletion(conn: Connection | Pool, blob_key: str, reason: DeletionReason) -> None:
    await conn.execute(query("schedule_blob_deletion"), blob_key, reason)


async def start_maintenance_run(conn: Connection | Pool, task: str, interval_seconds: float) -> bool:
    return bool(await conn.fetchval(query("start_maintenance_run"), task, interval_seconds))


@dataclass(frozen=True)
class IntentFilter:
    """Which intents to list; `state` is one of INTENT_SELECTIONS (a state, or "stuck")."""

    state: str | None = None
    user_id: str | None = None
    older_than_seconds: float | None = None
    intent_id: uuid.UUID | None = None


@dataclass(frozen=True)
class ListedIntent(Intent):
    replays: int
    lease_owner: str | None
    leased: bool


async def list_intents(
    conn: Connection | Pool, where: IntentFilter, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[ListedIntent]:
    cursor_at, cursor_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        query("list_intents"),
        where.state,
        where.user_id,
        where.older_than_seconds,
        cursor_at,
        cursor_id,
        limit,
        where.intent_id,
    )
    return [ListedIntent(**_intent_fields(row)) for row in rows]


@dataclass(frozen=True)
class ReplayTarget:
    id: uuid.UUID
    purpose: IntentPurpose
    state: IntentState
    user_id: str
    version: int
    leased: bool
    overtaken: bool
    staged: bool
    variant_names: list[str]


async def lock_intent_for_replay(conn: Connection, intent_id: uuid.UUID) -> ReplayTarget | None:
    """The intent locked for the transaction (and, first, an add_variants intent's profile)."""
    await conn.execute(query("lock_profile_of_add_variants_intent"), intent_id)
    row = await conn.fetchrow(query("lock_intent_for_replay"), intent_id)
    if row is None:
        return None
    return ReplayTarget(**{**dict(row), "purpose": IntentPurpose(row["purpose"]), "state": IntentState(row["state"])})


async def give_fresh_keys(conn: Connection, intent_id: uuid.UUID, blob_key: str, variant_keys: dict[str, str]) -> None:
    """The version of intent `intent_id` moves to `blob_key`, each of its variants to its key in
    `variant_keys`."""
    await conn.execute(query("give_fresh_key"), intent_id, blob_key, variant_keys)


async def give_fresh_variant_keys(conn: Connection, intent_id: uuid.UUID, variant_keys: dict[str, str]) -> None:
    """The variants dead add_variants intent `intent_id` still makes move to their keys in
    `variant_keys`; the old keys are scheduled for deletion."""
    await conn.execute(query("give_fresh_variant_keys"), intent_id, variant_keys)


async def replay_intent(conn: Connection, intent_id: uuid.UUID, max_attempts: int, traceparent: str | None) -> None:
    await conn.execute(query("replay_intent"), intent_id, max_attempts, traceparent)


@dataclass(frozen=True)
class QueueStats:
    pending: int
    in_progress: int
    stuck: int
    dead: int
    # Unfinished add_variants intents (counted in pending and in_progress too).
    adding_variants: int
    lag_seconds: float
    gc_scheduled: int
    gc_due: int

    def unfinished_and_dead(self) -> dict[str, int]:
        """Intents by what operators watch: pending, in progress, stuck and dead."""
        return {
            IntentState.PENDING: self.pending,
            IntentState.IN_PROGRESS: self.in_progress,
            STUCK: self.stuck,
            IntentState.DEAD: self.dead,
        }


async def queue_stats(conn: Connection | Pool, grace_seconds: float) -> QueueStats:
    row = await conn.fetchrow(query("queue_stats"), grace_seconds)
    assert row is not None
    return QueueStats(
        row["pending"],
        row["in_progress"],
        row["stuck"],
        row["dead"],
        row["adding_variants"],
        float(row["lag_seconds"]),
        row["gc_scheduled"],
        row["gc_due"],
    )


class Pruned(StrEnum):
    """What is deleted once past its retention."""

    FINISHED_INTENTS = "finished_intents"
    DEAD_INTENTS = "dead_intents"
    IDEMPOTENCY_KEYS = "idempotency_keys"
    BLOB_DELETIONS = "blob_deletions"
    REPLAY_JOBS = "replay_jobs"
    CONSOLE_SESSIONS = "console_sessions"


_PRUNE = {
    Pruned.FINISHED_INTENTS: query("prune_finished_intents"),
    Pruned.DEAD_INTENTS: query("prune_dead_intents"),
    Pruned.IDEMPOTENCY_KEYS: query("prune_idempotency_keys"),
    Pruned.BLOB_DELETIONS: query("prune_blob_deletions"),
    Pruned.REPLAY_JOBS: query("prune_replay_jobs"),
    Pruned.CONSOLE_SESSIONS: query("prune_console_sessions"),
}


async def prune(conn: Connection | Pool, what: Pruned, older_than_seconds: float, batch: int) -> int:
    """Delete one batch of `what` older than `older_than_seconds`; how many rows went."""
    status = await conn.execute(_PRUNE[what], older_than_seconds, batch)
    return int(status.split()[-1])


async def record_maintenance_report(
    conn: Connection | Pool, task: str, started_at: datetime, report: dict[str, Any]
) -> None:
    await conn.execute(query("record_maintenance_report"), task, started_at, report)


# --- the operator console ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConsoleOverview:
    """What the console's overview shows beside QueueStats."""

    oldest_due_id: uuid.UUID | None
    oldest_due_at: datetime | None
    gc_failing: int
    reconcile_started_at: datetime | None
    reconcile_finished_at: datetime | None
    reconcile_report: dict[str, Any] | None


async def console_overview(conn: Connection | Pool) -> ConsoleOverview:
    row = await conn.fetchrow(query("console_overview"))
    assert row is not None
    return ConsoleOverview(**dict(row))


@dataclass(frozen=True)
class FinishedInMinute:
    minutes_ago: int
    done: int
    superseded: int


async def finished_per_minute(conn: Connection | Pool) -> list[FinishedInMinute]:
    return [FinishedInMinute(**dict(row)) for row in await conn.fetch(query("finished_per_minute"))]


@dataclass(frozen=True, kw_only=True)
class IntentStorage:
    blob_key: str
    staged_bytes: int | None
    version_state: str
    sha256: str | None
    content_type: str | None
    width: int | None
    height: int | None


async def intent_storage(conn: Connection | Pool, intent_id: uuid.UUID) -> IntentStorage | None:
    row = await conn.fetchrow(query("intent_storage"), intent_id)
    return None if row is None else IntentStorage(**dict(row))


@dataclass(frozen=True, kw_only=True)
class ProfileRow:
    user_id: str
    newest_version: int
    live_version: int | None
    deleted: bool
    created_at: datetime
    updated_at: datetime


async def get_profile_row(conn: Connection | Pool, user_id: str) -> ProfileRow | None:
    row = await conn.fetchrow(query("get_profile_row"), user_id)
    return None if row is None else ProfileRow(**dict(row))


@dataclass(frozen=True, kw_only=True)
class VersionRow:
    version: int
    kind: VersionKind
    state: str
    metadata: dict[str, Any] | None
    blob_key: str | None
    size: int | None
    content_type: str | None
    width: int | None
    height: int | None
    created_at: datetime
    published_at: datetime | None
    intent_id: uuid.UUID | None
    intent_state: IntentState | None
    deletion_state: str | None
    # [{name, box, verified, width, height, size}], made or not, smallest box first.
    variants: list[dict[str, Any]]
    adding_intent_id: uuid.UUID | None
    adding_intent_state: IntentState | None


def _maybe_state(value: str | None) -> IntentState | None:
    return None if value is None else IntentState(value)


async def profile_versions(conn: Connection | Pool, user_id: str, limit: int) -> list[VersionRow]:
    rows = await conn.fetch(query("profile_versions"), user_id, limit)
    return [
        VersionRow(
            **{
                **dict(row),
                "kind": VersionKind(row["kind"]),
                "intent_state": _maybe_state(row["intent_state"]),
                "adding_intent_state": _maybe_state(row["adding_intent_state"]),
            }
        )
        for row in rows
    ]


@dataclass(frozen=True, kw_only=True)
class JobClaim:
    """A replay job leased to this worker."""

    id: uuid.UUID
    state: JobState
    selection: Replayable
    user_id: str | None
    older_than_seconds: float | None
    lease_token: uuid.UUID

    @property
    def filter(self) -> IntentFilter:
        return IntentFilter(state=self.selection, user_id=self.user_id, older_than_seconds=self.older_than_seconds)


async def submit_replay_job(
    conn: Connection | Pool, token: str, where: IntentFilter, requested_by: str
) -> tuple[uuid.UUID, bool]:
    """The job of `token`, and whether it replays `where` (False: the token was used for another filter)."""
    row = await conn.fetchrow(
        query("submit_replay_job"), token, where.state, where.user_id, where.older_than_seconds, requested_by
    )
    assert row is not None
    return row["id"], row["same_filter"]


async def claim_replay_job(conn: Connection | Pool, owner: str, lease_seconds: float) -> JobClaim | None:
    row = await conn.fetchrow(query("claim_replay_job"), owner, lease_seconds)
    if row is None:
        return None
    return JobClaim(**{**dict(row), "state": JobState(row["state"]), "selection": Replayable(row["selection"])})


async def start_replay_job(conn: Connection | Pool, job: JobClaim, intent_ids: list[uuid.UUID]) -> bool:
    return bool(await conn.fetchval(query("start_replay_job"), job.id, job.lease_token, intent_ids))


async def next_replay_job_intents(conn: Connection | Pool, job_id: uuid.UUID, limit: int) -> list[uuid.UUID]:
    return [row["intent_id"] for row in await conn.fetch(query("next_replay_job_intents"), job_id, limit)]


async def record_replay_outcome(conn: Connection, job: JobClaim, intent_id: uuid.UUID, outcome: str) -> bool:
    return bool(await conn.fetchval(query("record_replay_outcome"), job.id, job.lease_token, intent_id, outcome))


async def renew_replay_job(conn: Connection | Pool, job: JobClaim, lease_seconds: float) -> bool:
    return bool(await conn.fetchval(query("renew_replay_job"), job.id, job.lease_token, lease_seconds))


async def finish_replay_job(conn: Connection | Pool, job: JobClaim) -> None:
    await conn.execute(query("finish_replay_job"), job.id, job.lease_token)


@dataclass(frozen=True, kw_only=True)
class ReplayJob:
    id: uuid.UUID
    selection: Replayable
    user_id: str | None
    older_than_seconds: float | None
    requested_by: str
    state: JobState
    total: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    processed: int


async def list_replay_jobs(conn: Connection | Pool, job_id: uuid.UUID | None, limit: int) -> list[ReplayJob]:
    rows = await conn.fetch(query("list_replay_jobs"), job_id, limit)
    return [
        ReplayJob(**{**dict(row), "state": JobState(row["state"]), "selection": Replayable(row["selection"])})
        for row in rows
    ]


async def replay_job_outcomes(conn: Connection | Pool, job_id: uuid.UUID) -> dict[str, int]:
    return {row["outcome"]: row["count"] for row in await conn.fetch(query("replay_job_outcomes"), job_id)}


@dataclass(frozen=True, kw_only=True)
class JobIntent:
    """One intent of a job with its outcome and, unless it was pruned since, what it is now."""

    intent_id: uuid.UUID
    outcome: str
    user_id: str | None
    version: int | None
    state: str | None


async def replay_job_intents_with(
    conn: Connection | Pool, job_id: uuid.UUID, outcomes: list[str], limit: int
) -> list[JobIntent]:
    rows = await conn.fetch(query("replay_job_intents_with"), job_id, outcomes, limit)
    return [JobIntent(**dict(row)) for row in rows]


# --- console sessions ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConsoleSessionRow:
    subject: str
    csrf: str
    # Seconds since the epoch.
    expires_at: float


async def start_console_session(
    conn: Connection | Pool, id_sha256: bytes, subject: str, csrf: str, lifetime: float, token_expires_at: float
) -> float:
    """Keep a signed-in session; when it ends (seconds since the epoch)."""
    expires_at: float = await conn.fetchval(
        query("start_console_session"), id_sha256, subject, csrf, lifetime, token_expires_at
    )
    return expires_at


async def get_console_session(conn: Connection | Pool, id_sha256: bytes) -> ConsoleSessionRow | None:
    """The session, if it was neither ended nor has expired."""
    row = await conn.fetchrow(query("get_console_session"), id_sha256)
    return None if row is None else ConsoleSessionRow(**dict(row))


async def end_console_session(conn: Connection | Pool, id_sha256: bytes) -> None:
    await conn.execute(query("end_console_session"), id_sha256)


# --- the variant walk: live versions brought to the configured variants -------------------------


@dataclass(frozen=True)
class WalkState:
    after_user: str | None
    resting: bool
    newest: bool
    in_flight: int


@dataclass(frozen=True)
class VariantWork:
    user_id: str
    version: int
    busy: bool


@dataclass(frozen=True)
class Refreshed:
    """What refresh_variants did to one version: nothing (it was no longer live, or busy), or it
    removed `removed` variants and queued an add_variants intent for `to_make` of them."""

    refreshed: bool
    removed: int
    to_make: int
    queued: bool


async def announce_variant_configuration(conn: Connection | Pool, configuration: str) -> None:
    await conn.execute(query("announce_variant_configuration"), configuration)


async def lock_variant_walk(conn: Connection, configuration: str) -> WalkState | None:
    """The walk toward `configuration`, locked until the transaction ends; None if another worker
    holds it (or it was never announced)."""
    row = await conn.fetchrow(query("lock_variant_walk"), configuration)
    return None if row is None else WalkState(**dict(row))


async def variant_walk_window(conn: Connection | Pool, after_user: str | None, scan: int) -> str | None:
    user_id: str | None = await conn.fetchval(query("variant_walk_window"), after_user, scan)
    return user_id


async def find_variant_work(
    conn: Connection | Pool, after_user: str | None, upto_user: str | None, configured: list[dict[str, Any]], limit: int
) -> list[VariantWork]:
    rows = await conn.fetch(query("find_variant_work"), after_user, configured, limit, upto_user)
    return [VariantWork(**dict(row)) for row in rows]


async def refresh_variants(
    pool: Pool, work: VariantWork, planned: list[dict[str, Any]], max_attempts: int
) -> Refreshed:
    """Under the profile's lock, taken by a statement of its own: the refresh's snapshot, taken
    after it, holds whatever a replay of the version's add_variants intent committed before (a
    replay takes the same lock), so the refresh never queues a second unfinished one."""
    async with pool.acquire() as conn, conn.transaction():
        head = await lock_existing_profile(conn, work.user_id)
        if head is None or head.live_version != work.version:
            return Refreshed(refreshed=False, removed=0, to_make=0, queued=False)
        row = await conn.fetchrow(query("refresh_variants"), work.user_id, work.version, planned, max_attempts)
    assert row is not None
    return Refreshed(**dict(row))


async def advance_variant_walk(
    conn: Connection, configuration: str, after_user: str | None, changes: int, rest_seconds: float
) -> None:
    await conn.execute(query("advance_variant_walk"), configuration, after_user, changes, rest_seconds)

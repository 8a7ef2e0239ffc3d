"""One fault-injection run: chaos under load, then drain, garbage collection past the grace period,
a snapshot of the database and the bucket, and the checker's verdict with the run's figures."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from service.core import repository
from service.core.blobstore import open_blob_store
from service.core.repository import Pool
from service.core.settings import Settings
from tests.faults.chaos import FLEET_STALL, KINDS, WORKER_PAUSE, Chaos, Fault
from tests.faults.checker import Violation, check, reads_of_deleted_versions
from tests.faults.cluster import Cluster, running_cluster
from tests.faults.history import AdminAction, FinalIntent, History, LiveVersion, Route, Snapshot
from tests.faults.load import Load, users
from tests.faults.operator import Operator
from tests.support import let_grace_pass, until_intents_finish
from workers.maintenance import DELETION_LEASE_SECONDS, Collector, reconcile

DRAIN_SECONDS = 90.0
GC_ROUNDS = 5


@dataclass(frozen=True)
class RunConfig:
    seconds: float = 40.0
    seed: int = 20261127
    users: int = 8
    writers: int = 3
    readers: int = 4
    apis: int = 2
    workers: int = 3

    @classmethod
    def from_environment(cls) -> RunConfig:
        """PROFILES_FAULTS_SECONDS and PROFILES_FAULTS_SEED override the defaults."""
        return cls(
            seconds=float(os.environ.get("PROFILES_FAULTS_SECONDS", cls.seconds)),
            seed=int(os.environ.get("PROFILES_FAULTS_SEED", cls.seed)),
        )


@dataclass
class GcFigures:
    rounds: int = 0
    scheduled: Counter[str] = field(default_factory=Counter)  # by reconciliation, by reason
    deleted: int = 0
    failed: int = 0


@dataclass
class RunResult:
    config: RunConfig
    history: History
    snapshot: Snapshot
    faults: list[Fault]
    violations: list[Violation]
    unplanned_exits: Counter[str]
    gc: GcFigures
    lease_seconds: float
    phases: dict[str, float]
    process_errors: list[str]  # the latest ERROR lines of each slot
    error_lines: int  # all of them

    def faults_by_kind(self) -> Counter[str]:
        return Counter(fault.kind for fault in self.faults)

    def replay_outcomes(self, *actions: AdminAction) -> Counter[str]:
        """What the admin API said of each intent the operator asked it to replay (by these actions)."""
        wanted = actions or (AdminAction.REPLAY, AdminAction.REPLAY_STUCK)
        return Counter(outcome for call in self.history.admin if call.action in wanted for outcome in call.outcomes)

    def died(self) -> set[str]:
        """Intents known to have died: listed dead by the operator, or dead at the end."""
        listed = {i for call in self.history.admin if call.action is AdminAction.LIST_DEAD for i in call.intents}
        return listed | {i.intent_id for i in self.snapshot.intents.values() if i.state == "dead"}

    def replayed(self) -> list[FinalIntent]:
        return [intent for intent in self.snapshot.intents.values() if intent.replays]


async def run(config: RunConfig) -> RunResult:
    phases: dict[str, float] = {}
    began = time.monotonic()
    async with running_cluster(config.apis, config.workers) as cluster:
        phases["start-up"] = time.monotonic() - began
        clock = _Clock()
        timeout = cluster.settings.request_timeout_seconds + 2
        load = Load(cluster.api_urls, users(config.users), config.seed, timeout, clock)
        chaos = Chaos(cluster, config.seed, clock)
        operator = Operator(cluster.api_urls, load.history, config.seed, timeout, clock)
        mark = time.monotonic()
        await _chaos_under_load(cluster, load, chaos, operator, config)
        phases["chaos"] = time.monotonic() - mark
        mark = time.monotonic()
        snapshot, gc = await _settle(cluster, load)
        phases["drain, gc, snapshot"] = time.monotonic() - mark
        mark = time.monotonic()
    phases["teardown"] = time.monotonic() - mark
    phases["total"] = time.monotonic() - began
    return RunResult(
        config=config,
        history=load.history,
        snapshot=snapshot,
        faults=chaos.faults,
        violations=check(load.history, snapshot),
        unplanned_exits=cluster.unplanned_exits,
        gc=gc,
        lease_seconds=cluster.settings.lease_seconds,
        phases=phases,
        process_errors=sorted(line for slot in cluster.slots for line in slot.errors.kept),
        error_lines=sum(slot.errors.count for slot in cluster.slots),
    )


class _Clock:
    """Seconds since the chaos began: the times in the history and in the checker's messages."""

    def __init__(self) -> None:
        self._origin = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._origin


async def _chaos_under_load(cluster: Cluster, load: Load, chaos: Chaos, operator: Operator, config: RunConfig) -> None:
    stop = asyncio.Event()
    supervisor = asyncio.create_task(cluster.supervise())
    working = [
        asyncio.create_task(load.run(stop, config.writers, config.readers)),
        asyncio.create_task(chaos.run(stop)),
        asyncio.create_task(operator.run(stop)),
    ]
    try:
        everything = [*working, supervisor]
        done, _ = await asyncio.wait(everything, timeout=config.seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a load, chaos or supervisor failure ends the run here
    finally:
        stop.set()
        try:
            await asyncio.gather(*working)
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)


async def _settle(cluster: Cluster, load: Load) -> tuple[Snapshot, GcFigures]:
    """Everything up, every intent finished, final reads, processes stopped, GC past the grace period."""
    await cluster.heal()
    settings = cluster.settings
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=2, timeout=5)
    try:

        async def drained() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM intents WHERE state IN ('pending', 'in_progress')")

        await until_intents_finish(settings.database_url, drained, what="every intent to finish", timeout=DRAIN_SECONDS)
        await load.final_reads()
        # Nothing may write to the bucket from here on, so the bucket can settle.
        await cluster.stop_processes()
        gc = await _collect_past_grace(settings, pool)
        snapshot = await _snapshot(settings, pool)
    finally:
        await pool.close()
    return snapshot, gc


async def _collect_past_grace(settings: Settings, pool: Pool) -> GcFigures:
    """Reconcile the bucket and collect, with time moved past the grace period (and past the
    deletion lease of a collector that was killed mid-way), until a round finds nothing to do."""
    figures = GcFigures()
    async with open_blob_store(settings) as blobs:
        collector = Collector(settings, pool, blobs)
        for round_number in range(1, GC_ROUNDS + 1):
            figures.rounds = round_number
            found = await reconcile(settings, pool, blobs)
            figures.scheduled.update(found.scheduled)
            await let_grace_pass(pool, settings.gc_grace_seconds)
            await pool.execute(
                "UPDATE blob_deletions SET leased_until = leased_until - make_interval(secs => $1)"
                " WHERE state = 'scheduled'",
                DELETION_LEASE_SECONDS + 1,
            )
            report = await collector.collect_due()
            figures.deleted += report.deleted
            figures.failed += report.failed
            if not found.scheduled and not report.deleted and not report.failed:
                break
    return figures


async def _snapshot(settings: Settings, pool: Pool) -> Snapshot:
    intents = {
        str(row["id"]): FinalIntent(
            str(row["id"]), row["user_id"], row["version"], row["state"], row["last_error"], row["replays"]
        )
        for row in await pool.fetch("SELECT id, user_id, version, state, last_error, replays FROM intents")
    }
    variants: dict[str, dict[str, tuple[str, str]]] = {}
    for row in await pool.fetch(
        "SELECT w.user_id, w.name, w.blob_key, w.sha256 FROM profiles p"
        " JOIN version_variants w ON w.user_id = p.user_id AND w.version = p.live_version WHERE w.verified"
    ):
        variants.setdefault(row["user_id"], {})[row["name"]] = (row["blob_key"], row["sha256"])
    live = {
        row["user_id"]: LiveVersion(
            row["user_id"],
            row["version"],
            row["kind"],
            row["token"],
            row["blob_key"],
            row["sha256"],
            variants.get(row["user_id"], {}),
        )
        for row in await pool.fetch(
            "SELECT p.user_id, v.version, v.kind, v.metadata->>'display_name' AS token, v.blob_key, v.sha256"
            " FROM profiles p JOIN versions v ON v.user_id = p.user_id AND v.version = p.live_version"
        )
    }
    pending = await pool.fetch(
        "SELECT b.blob_key FROM intents i JOIN version_blobs b ON b.user_id = i.user_id AND b.version = i.version"
        " WHERE i.state IN ('pending', 'in_progress')"
    )
    async with open_blob_store(settings) as blobs:
        keys = await blobs.list_keys(settings.s3_key_prefix)
        bucket = {key: hashlib.sha256(await blobs.read(key)).hexdigest() for key in keys}
    return Snapshot(intents, live, frozenset(row["blob_key"] for row in pending), bucket)


def _outcomes(statuses: list[int | None]) -> str:
    counted = Counter("no answer" if status is None else str(status) for status in statuses)
    return ", ".join(f"{name}: {n}" for name, n in sorted(counted.items(), key=lambda item: -item[1]))


def figures(result: RunResult) -> str:
    """The run's figures as a small table: operations, faults injected, final state, violations."""
    history, snapshot, config = result.history, result.snapshot, result.config
    faults = result.faults_by_kind()
    past_lease = sum(
        1 for f in result.faults if f.kind in (WORKER_PAUSE, FLEET_STALL) and f.held > result.lease_seconds
    )
    states = Counter(intent.state for intent in snapshot.intents.values())
    reconciled = f"reconciliation scheduled: {_counter(result.gc.scheduled)}"
    reads = {route: [r.status for r in history.reads if r.route is route] for route in Route}
    after_delete = [r.status for r in reads_of_deleted_versions(history)]
    replayed = result.replayed()
    dead, stuck = result.replay_outcomes(AdminAction.REPLAY), result.replay_outcomes(AdminAction.REPLAY_STUCK)
    rows = [
        ("writes (PUT)", len(history.writes), _outcomes([w.status for w in history.writes])),
        ("deletes", len(history.deletes), _outcomes([d.status for d in history.deletes])),
        *((f"reads ({route})", len(reads[route]), _outcomes(reads[route])) for route in Route),
        ("  of versions under a tombstone", len(after_delete), _outcomes(after_delete) or "-"),
        ("operator calls", len(history.admin), _outcomes([c.status for c in history.admin])),
        ("  replays of dead intents", sum(dead.values()), _counter(dead)),
        ("  bulk replays of stuck ones", sum(stuck.values()), _counter(stuck)),
        ("intents that died", len(result.died()), "listed dead by the operator or dead at the end"),
        ("intents replayed", len(replayed), _counter(Counter(i.state for i in replayed))),
        ("faults injected", len(result.faults), ", ".join(f"{kind}: {faults[kind]}" for kind in KINDS)),
        ("  worker pauses past the lease", past_lease, f"lease {result.lease_seconds:g} s"),
        ("unplanned process exits", sum(result.unplanned_exits.values()), _counter(result.unplanned_exits)),
        ("error lines logged", result.error_lines, "by the API and worker processes"),
        ("final intents", len(snapshot.intents), _counter(states)),
        ("live profiles", len(snapshot.live), _counter(Counter(v.kind for v in snapshot.live.values()))),
        ("bucket blobs after gc", len(snapshot.bucket), f"{len(snapshot.pending_keys)} of pending intents"),
        ("blobs deleted by the final gc", result.gc.deleted, f"{result.gc.rounds} round(s), {reconciled}"),
        ("violations", len(result.violations), _counter(Counter(str(v.kind) for v in result.violations))),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"fault injection: {config.seconds:g} s of chaos, seed {config.seed}, {config.apis} API + "
        f"{config.workers} worker processes, {config.users} users, {config.writers} writers, {config.readers} readers",
        *(f"  {name:<{width}}  {count:>6}  {detail}" for name, count, detail in rows),
        "  phases: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.phases.items()),
    ]
    lines.extend(f"  ! {violation}" for violation in result.violations[:50])
    if result.violations:
        # When each fault happened, and what the processes logged as errors, explain the violations.
        timeline = sorted(result.faults, key=lambda fault: fault.start)[:80]
        lines.extend(f"  fault {f.start:8.3f}-{f.end:8.3f} {f.kind} of {f.target}" for f in timeline)
        # Errors of the API processes first: those are the ones requests saw.
        by_api_first = sorted(result.process_errors, key=lambda line: " | api-" not in line)
        lines.extend(f"  log {line}" for line in by_api_first[:30])
    return "\n".join(lines)


def _counter(counts: Counter[str]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.most_common()) or "-"

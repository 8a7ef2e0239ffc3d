"""A short fault-injection run (PROFILES_FAULTS_SECONDS, default 40 s of chaos) held against the contract.

The run happens once per module; each test checks one family of guarantees on its result."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from service.core.operations import ReplayOutcome
from tests.faults.chaos import KINDS
from tests.faults.checker import Kind, reads_of_deleted_versions
from tests.faults.history import Route
from tests.faults.run import RunConfig, RunResult, figures, run

CONFIG = RunConfig.from_environment()
# Start-up, drain, gc and teardown take about 20 s on 2 cores; the rest is margin for a slow machine.
pytestmark = pytest.mark.timeout(int(CONFIG.seconds) + 150)

READS = {
    Kind.MIXED_PAIR,
    Kind.FOREIGN_DATA,
    Kind.UNKNOWN_PAIR,
    Kind.WRONG_VERSION,
    Kind.BAD_STATUS,
    Kind.LOST_PROFILE,
    Kind.STALE_READ,
    Kind.FOREIGN_VARIANT,
}
WRITES = {Kind.LOST_WRITE, Kind.UNEXPLAINED_DEAD, Kind.LIVE_REGRESSED, Kind.UNKNOWN_LIVE}
BLOBS = {Kind.DANGLING_POINTER, Kind.ORPHAN_BLOB}
DELETES = {Kind.RESURRECTED}
OPERATOR = {Kind.BAD_ADMIN_ANSWER}


@pytest.fixture(scope="module")
def result() -> RunResult:
    # A plain (not async) fixture: one event loop of its own for the whole run, shared by no test.
    outcome = asyncio.run(run(CONFIG))
    print(figures(outcome))
    return outcome


def violations_of(result: RunResult, kinds: Iterable[Kind]) -> list[str]:
    wanted = set(kinds)
    return [str(v) for v in result.violations if v.kind in wanted]


def test_the_run_injected_every_kind_of_fault_while_writes_deletes_and_reads_went_through(result: RunResult) -> None:
    # A run that did nothing would pass every check below: make sure it did something.
    history = result.history
    assert set(result.faults_by_kind()) == set(KINDS), figures(result)
    assert sum(write.accepted for write in history.writes) >= 50, figures(result)
    assert any(delete.status == 204 for delete in history.deletes), figures(result)
    assert sum(read.status == 200 for read in history.reads) >= 100, figures(result)
    assert any(read.status == 503 for read in history.reads), "no outage was ever seen by a reader"
    states = {intent.state for intent in result.snapshot.intents.values()}
    assert {"done", "superseded"} <= states, figures(result)


def test_intents_died_the_operator_replayed_them_and_readers_asked_for_versions_a_delete_had_buried(
    result: RunResult,
) -> None:
    # Without deaths, replays and reads under a tombstone, the rules on them would pass vacuously.
    assert result.died(), figures(result)
    assert result.replay_outcomes()[ReplayOutcome.REPLAYED] > 0, figures(result)
    assert result.replayed(), figures(result)
    assert any(r.status == 200 and r.route is Route.VERSION_IMAGE for r in result.history.reads), figures(result)
    assert any(r.status == 200 and r.route is Route.VARIANT for r in result.history.reads), figures(result)
    assert reads_of_deleted_versions(result.history), figures(result)


def test_every_read_was_one_accepted_writes_exact_pair_or_an_honest_404_or_503(result: RunResult) -> None:
    assert violations_of(result, READS) == [], figures(result)


def test_every_acknowledged_write_ended_live_superseded_or_dead_with_its_reason(result: RunResult) -> None:
    assert violations_of(result, WRITES) == [], figures(result)


def test_every_live_version_has_its_blob_and_after_gc_no_blob_is_left_without_a_live_or_pending_version(
    result: RunResult,
) -> None:
    assert violations_of(result, BLOBS) == [], figures(result)


def test_the_admin_api_answered_every_listing_and_replay_of_the_operator_as_it_promises(result: RunResult) -> None:
    assert violations_of(result, OPERATOR) == [], figures(result)


def test_nothing_at_or_below_a_tombstone_was_served_or_went_live_after_its_delete_answered(result: RunResult) -> None:
    assert violations_of(result, DELETES) == [], figures(result)


def test_the_families_above_cover_every_kind_of_violation_the_checker_knows() -> None:
    assert set(Kind) == READS | WRITES | BLOBS | DELETES | OPERATOR

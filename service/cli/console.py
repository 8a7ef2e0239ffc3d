"""The operator commands `profiles intents …` and `profiles gc`: tables for people, --json for scripts."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from enum import Enum
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from service.core import operations, repository
from service.core.blobstore import BlobStore, open_blob_store
from service.core.domain import MAX_INTENT_AGE_SECONDS, utc_text
from service.core.repository import IntentFilter, ListedIntent, Pool
from service.core.settings import Settings
from workers.maintenance import Collector, prune, reconcile

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
LIST_COLUMNS = (
    "intent_id",
    "user_id",
    "version",
    "purpose",
    "state",
    "attempts",
    "replays",
    "updated_at",
    "last_error",
)


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d' → seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 2h or 7d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_INTENT_AGE_SECONDS:
        raise ValueError(f"{text!r} is longer than ten years")
    return seconds


@asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[Pool]:
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=2, timeout=10)
    try:
        yield pool
    finally:
        await pool.close()


def _console() -> Console:
    # Piped output keeps whole rows (ids, errors) instead of folding them at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, Enum):
        return value.value
    return str(value) if isinstance(value, uuid.UUID) else value


def _intent_row(intent: ListedIntent) -> dict[str, Any]:
    """An intent as the commands show it (the fields of the admin API, `id` named `intent_id`)."""
    fields = {("intent_id" if name == "id" else name): value for name, value in dataclasses.asdict(intent).items()}
    return {name: _json_value(value) for name, value in fields.items()}


def _intents_table(intents: list[ListedIntent]) -> Table:
    table = Table(*LIST_COLUMNS, title=f"{len(intents)} intent(s)")
    for intent in intents:
        row = _intent_row(intent)
        row["updated_at"] = intent.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        row["last_error"] = (intent.last_error or "")[:60]
        table.add_row(*(str(row[column]) for column in LIST_COLUMNS))
    return table


async def intents_list(settings: Settings, where: IntentFilter, limit: int, as_json: bool) -> None:
    async with _pool(settings) as pool:
        found = await operations.list_intents(pool, where, limit)
    if as_json:
        _print_json([_intent_row(intent) for intent in found])
    else:
        _console().print(_intents_table(found))


async def intents_show(settings: Settings, intent_id: uuid.UUID, as_json: bool) -> bool:
    async with _pool(settings) as pool:
        found = await operations.show_intent(pool, intent_id)
    if found is None:
        print(f"no intent {intent_id}", file=sys.stderr)
        return False
    intent = _intent_row(found)
    if as_json:
        _print_json(intent)
    else:
        table = Table("field", "value", show_header=False)
        for field, value in intent.items():
            table.add_row(field, str(value))
        _console().print(table)
    return True


async def intents_replay(
    settings: Settings, ids: list[uuid.UUID], where: IntentFilter | None, *, dry_run: bool, as_json: bool
) -> bool:
    """Replay the given intents, or all matching `where`; True if none was refused."""
    async with _pool(settings) as pool:
        if where is not None:
            ids = await operations.replayable_ids(pool, where)
        results: list[dict[str, str]] = []
        with Progress(disable=as_json or len(ids) < 2, transient=True) as progress:
            task = progress.add_task("replaying", total=len(ids))

            def advance(intent_id: uuid.UUID, outcome: operations.ReplayOutcome) -> None:
                results.append({"intent_id": str(intent_id), "outcome": outcome.value})
                progress.advance(task)

            outcomes = await operations.replay_all(pool, settings, ids, dry_run=dry_run, progress=advance)
    if as_json:
        _print_json({"outcomes": {k.value: v for k, v in outcomes.items()}, "intents": results})
    else:
        if results:
            table = Table("intent_id", "outcome", title="dry run: nothing changed" if dry_run else None)
            for result in results:
                table.add_row(result["intent_id"], result["outcome"])
            _console().print(table)
        print(", ".join(f"{count} {outcome.value}" for outcome, count in outcomes.items()) or "nothing to replay")
    return not any(outcome.refused for outcome in outcomes)


async def gc(settings: Settings, *, reconcile_bucket: bool, dry_run: bool, as_json: bool) -> None:
    async with _pool(settings) as pool, open_blob_store(settings) as blobs:
        report = await _gc(settings, pool, blobs, reconcile_bucket=reconcile_bucket, dry_run=dry_run)
    if as_json:
        _print_json(report)
        return
    table = Table("step", "result", show_header=False, title="dry run: nothing changed" if dry_run else None)
    for step, result in report.items():
        table.add_row(step, json.dumps(result))
    _console().print(table)


async def _gc(
    settings: Settings, pool: Pool, blobs: BlobStore, *, reconcile_bucket: bool, dry_run: bool
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if reconcile_bucket:
        report["reconcile"] = (await reconcile(settings, pool, blobs, dry_run=dry_run)).as_dict()
    if not dry_run:
        collected = await Collector(settings, pool, blobs).collect_due()
        report["collect"] = {"deleted": collected.deleted, "failed": collected.failed}
        report["prune"] = await prune(settings, pool)
    stats = await repository.queue_stats(pool, settings.gc_grace_seconds)
    report["backlog"] = {"scheduled": stats.gc_scheduled, "due": stats.gc_due}
    return report

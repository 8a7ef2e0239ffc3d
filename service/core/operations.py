"""What operators do to intents, shared by `profiles intents` and /v1/admin/intents: list, replay."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from enum import StrEnum

from service.core import repository
from service.core.domain import IntentState, Replayable, new_blob_key
from service.core.repository import IntentFilter, ListedIntent, Pool, ReplayTarget
from service.core.settings import Settings

PAGE = 500


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
    if target.state == IntentState.PENDING:
        return ReplayOutcome.ALREADY_PENDING
    if target.state in (IntentState.DONE, IntentState.SUPERSEDED):
        return ReplayOutcome.FINISHED
    if not target.staged:
        return ReplayOutcome.NO_STAGED_BYTES
    return None


async def replay(pool: Pool, settings: Settings, intent_id: uuid.UUID, *, dry_run: bool = False) -> ReplayOutcome:
    """Send a dead or stuck intent round again with a fresh attempt budget. Safe to repeat: a
    replayed intent is pending, and replaying a pending one does nothing."""
    async with pool.acquire() as conn, conn.transaction():
        target = await repository.lock_intent_for_replay(conn, intent_id)
        refusal = _refusal(target)
        if refusal is not None:
            return refusal
        assert target is not None
        if dry_run:
            return ReplayOutcome.WOULD_REPLAY
        if target.state == IntentState.DEAD:
            # Its keys were scheduled for deletion when it died: those keys are dead for good.
            fresh = {name: new_blob_key(settings.s3_key_prefix) for name in target.variant_names}
            await repository.give_fresh_keys(conn, intent_id, new_blob_key(settings.s3_key_prefix), fresh)
        await repository.replay_intent(conn, intent_id, settings.max_attempts)
    return ReplayOutcome.REPLAYED


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

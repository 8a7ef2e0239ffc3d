"""The variant walk: brings every live version to the configured variants after the configuration
changes, through a bounded number of add_variants intents at a time, resuming where it stopped."""

from __future__ import annotations

import logging
from typing import Any

from service.core import metrics, repository
from service.core.domain import new_blob_key
from service.core.repository import Pool, VariantWork
from service.core.settings import Settings

log = logging.getLogger(__name__)

# Profiles one round looks at, at most: a pass over many profiles that need nothing is spread over
# rounds instead of one long statement.
SCAN = 20_000


class VariantWalk:
    """One worker's part in the walk toward its own configuration. Every round, the one worker that
    locks the walk looks at the next profiles in user order and, for each live version whose
    variants differ, removes the variants no longer configured and queues one add_variants intent
    for the missing ones, never more than `variant_backfill_in_flight` in flight."""

    def __init__(self, settings: Settings, pool: Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._configuration = settings.variant_configuration
        fmt = settings.variant_format
        self._configured = [{"name": s.name, "box": s.box, "content_type": fmt.content_type} for s in settings.variants]
        self._announced = False

    async def round(self) -> int:
        """One round of the walk; how many versions it found to differ (0 when another worker or a
        newer configuration has the walk, it rests, or enough intents are in flight). The first
        round of a worker announces its configuration: the one announced last is walked to."""
        if not self._announced:
            await repository.announce_variant_configuration(self._pool, self._configuration)
            self._announced = True
        limit = self._settings.variant_backfill_in_flight
        async with self._pool.acquire() as conn, conn.transaction():
            walk = await repository.lock_variant_walk(conn, self._configuration)
            if walk is None or walk.resting or not walk.newest or walk.in_flight >= limit:
                return 0
            room = limit - walk.in_flight
            upto = await repository.variant_walk_window(conn, walk.after_user, SCAN)
            found = await repository.find_variant_work(conn, walk.after_user, upto, self._configured, room)
            for work in found:
                await self._refresh(work)
            after = found[-1].user_id if len(found) == room else upto
            rest = self._settings.reconcile_interval_seconds
            await repository.advance_variant_walk(conn, self._configuration, after, len(found), rest)
        return len(found)

    async def _refresh(self, work: VariantWork) -> None:
        """Each version in its own short transaction (the profile's lock is held only for it). One
        that changed meanwhile, or has an add_variants intent in flight, is left to the next pass."""
        if work.busy:
            return
        refreshed = await repository.refresh_variants(self._pool, work, self._planned(), self._settings.max_attempts)
        if refreshed.removed:
            metrics.VARIANT_WALK.labels("removed").inc()
        if refreshed.queued:
            metrics.VARIANT_WALK.labels("queued").inc()
            log.info("v%d of %s: %d variant(s) to make", work.version, work.user_id, refreshed.to_make)

    def _planned(self) -> list[dict[str, Any]]:
        prefix = self._settings.s3_key_prefix
        return [{**variant, "blob_key": new_blob_key(prefix)} for variant in self._configured]

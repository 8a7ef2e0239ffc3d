"""Batched publishing: attempts that finish at about the same time are published by one fenced
statement (publish_intents), at most one intent per user in a batch."""

from __future__ import annotations

import asyncio

from service.core import metrics, repository
from service.core.domain import IntentState
from service.core.repository import Claim, Pool

Waiting = tuple[Claim, "asyncio.Future[IntentState | None]"]


class Publisher:
    """While one batch is being published, what finishes meanwhile waits and goes in the next one:
    no timer, so a lone intent is published at once and a busy worker publishes in bulk."""

    def __init__(self, pool: Pool, *, max_batch: int) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._waiting: list[Waiting] = []
        self._flushing: asyncio.Task[None] | None = None

    async def publish(self, claim: Claim) -> IntentState | None:
        """The intent's final state, or None if its lease was lost; raises what the statement raised."""
        future: asyncio.Future[IntentState | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((claim, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # attempts finishing in this same turn of the loop join the first batch
            while batch := self._next_batch():
                await self._publish(batch)
        finally:
            self._flushing = None

    def _next_batch(self) -> list[Waiting]:
        """Up to max_batch waiting claims of distinct users; a cancelled attempt's claim is dropped
        (its intent is being released). A user's later claim waits for the next batch."""
        batch: list[Waiting] = []
        users: set[str] = set()
        kept: list[Waiting] = []
        for claim, future in self._waiting:
            if future.done():
                continue
            if claim.user_id in users or len(batch) == self._max_batch:
                kept.append((claim, future))
                continue
            users.add(claim.user_id)
            batch.append((claim, future))
        self._waiting = kept
        return batch

    async def _publish(self, batch: list[Waiting]) -> None:
        metrics.PUBLISH_BATCH.observe(len(batch))
        try:
            states = await repository.publish_intents(self._pool, [claim for claim, _ in batch])
        except Exception as exc:  # every attempt of the batch fails with it, and is retried
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for claim, future in batch:
            if not future.done():
                future.set_result(states.get(claim.id))

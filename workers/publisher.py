"""Batched publishing: attempts that finish at about the same time are published by one fenced
statement (publish_intents), at most one intent per user in a batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import NamedTuple

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from service.core import metrics, repository, tracing
from service.core.domain import IntentState
from service.core.repository import Finished, Pool


class Waiting(NamedTuple):
    finished: Finished
    future: asyncio.Future[IntentState | None]
    # The span of the attempt that waits: the statement's span belongs to the batch's first one.
    span: SpanContext


class Publisher:
    """While one batch is being published, what finishes meanwhile waits and goes in the next one:
    no timer, so a lone intent is published at once and a busy worker publishes in bulk. A batch
    never waits for a profile another transaction holds: such an intent comes back busy and is
    published on its own, beside the batches, once that profile is free."""

    def __init__(self, pool: Pool, *, max_batch: int) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._waiting: list[Waiting] = []
        self._flushing: asyncio.Task[None] | None = None
        self._alone: set[asyncio.Task[None]] = set()

    async def publish(self, finished: Finished) -> IntentState | None:
        """The intent's final state, or None if its lease was lost; raises what the statement raised."""
        future: asyncio.Future[IntentState | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(finished, future, trace.get_current_span().get_span_context()))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    def abort(self) -> None:
        """Cancel what is being published (a second stop request): every waiting attempt is
        cancelled with it, and each intent stays as its fence leaves it."""
        for task in (self._flushing, *self._alone):
            if task is not None:
                task.cancel()

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # attempts finishing in this same turn of the loop join the first batch
            while batch := self._next_batch():
                await self._publish(batch)
        finally:
            self._flushing = None
            for waiting in self._waiting:
                waiting.future.cancel()  # only if the flush itself was cancelled: otherwise nothing waits
            self._waiting = []

    def _next_batch(self) -> list[Waiting]:
        """Up to max_batch waiting claims of distinct users; a cancelled attempt's claim is dropped
        (its intent is being released). A user's later claim waits for the next batch."""
        batch: list[Waiting] = []
        users: set[str] = set()
        kept: list[Waiting] = []
        for waiting in self._waiting:
            if waiting.future.done():
                continue
            if waiting.finished.claim.user_id in users or len(batch) == self._max_batch:
                kept.append(waiting)
                continue
            users.add(waiting.finished.claim.user_id)
            batch.append(waiting)
        self._waiting = kept
        return batch

    async def _publish(self, batch: list[Waiting]) -> None:
        with _answering(batch), _batch_span(batch):
            metrics.PUBLISH_BATCH.observe(len(batch))
            published = await repository.publish_intents(self._pool, [waiting.finished for waiting in batch])
            for waiting in batch:
                if waiting.finished.claim.id in published.busy:
                    self._publish_alone(waiting)
                elif not waiting.future.done():
                    waiting.future.set_result(published.states.get(waiting.finished.claim.id))

    def _publish_alone(self, waiting: Waiting) -> None:
        finished, future, _ = waiting

        async def alone() -> None:
            with _answering([waiting]), _batch_span([waiting]):
                async with self._pool.acquire() as conn:
                    state = await repository.publish_intent(conn, finished)
                if not future.done():
                    future.set_result(state)

        task = asyncio.create_task(alone())
        self._alone.add(task)
        task.add_done_callback(self._alone.discard)


@contextlib.contextmanager
def _batch_span(batch: list[Waiting]) -> Iterator[None]:
    """A span for one fenced statement: a child of the first attempt's span, linked to the others'."""
    first, *others = batch
    with tracing.tracer().start_as_current_span(
        "publish",
        context=trace.set_span_in_context(trace.NonRecordingSpan(first.span)),
        links=[Link(waiting.span) for waiting in others if waiting.span.is_valid],
        attributes={"profiles.batch_intents": len(batch)},
    ):
        yield


@contextlib.contextmanager
def _answering(batch: list[Waiting]) -> Iterator[None]:
    """Whatever ends the block early reaches every attempt still waiting: an error fails each of
    them (each is retried), a cancellation cancels them."""
    try:
        yield
    except Exception as exc:
        for waiting in batch:
            if not waiting.future.done():
                waiting.future.set_exception(exc)
    except BaseException:
        for waiting in batch:
            waiting.future.cancel()
        raise

"""A per-process budget of the memory uploads hold: beyond it uploads are shed with 503, so many large
uploads at once cannot exhaust the process's memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class BudgetExceeded(Exception):
    pass


class Reservation:
    """The bytes one request holds; they return to the budget when the request ends, or, if a thread
    still works on them then, when that thread does."""

    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        self._budget.take(size, self.held)
        self.held += size

    async def in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` in a thread. A thread cannot be stopped: when the request is cancelled meanwhile
        (its deadline), the thread runs on with the bytes, so they stay charged until it ends."""
        future = asyncio.get_running_loop().run_in_executor(None, work, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            held, self.held = self.held, 0
            future.add_done_callback(lambda done: self._budget.release(held, done))
            raise


class UploadBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def take(self, size: int, own: int = 0) -> None:
        """Charge `size` more bytes to a request already holding `own`. A request with the budget to
        itself is never refused: an image the contract accepts may need more than the whole budget to
        check, and then it waits its turn (503s) rather than being refused for ever."""
        if self.in_flight + size > self.limit and self.in_flight > own:
            raise BudgetExceeded(f"{self.in_flight} of {self.limit} upload bytes are in flight")
        self.in_flight += size

    def release(self, size: int, finished: asyncio.Future[Any] | None = None) -> None:
        if finished is not None and not finished.cancelled():
            finished.exception()  # retrieved: nobody awaits a check whose request is gone
        self.in_flight -= size

    @contextmanager
    def reservation(self) -> Iterator[Reservation]:
        held = Reservation(self)
        try:
            yield held
        finally:
            self.release(held.held)

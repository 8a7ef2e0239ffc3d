"""A per-process budget of the memory uploads hold: beyond it uploads are shed with 503, so many large
uploads at once cannot exhaust the process's memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class BudgetExceeded(Exception):
    pass


class Reservation:
    """The bytes one request holds; they return to the budget when the request ends."""

    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        self._budget.take(size, self.held)
        self.held += size


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

    @contextmanager
    def reservation(self) -> Iterator[Reservation]:
        held = Reservation(self)
        try:
            yield held
        finally:
            self.in_flight -= held.held

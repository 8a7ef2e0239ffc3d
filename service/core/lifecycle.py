"""Process lifecycle shared by the commands: a two-phase shutdown and the signals that drive it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType

# SIGHUP too: a closed terminal must stop the dev stack's engines, not orphan them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Shutdown:
    """The first request stops taking work and lets what is in flight finish (`graceful`); the
    second gives in-flight work back at once (`immediate`). Each phase is its own Event, set once,
    so that every part of a process that waits on one hears it (nobody clears an Event to catch
    the next signal)."""

    graceful: asyncio.Event = field(default_factory=asyncio.Event)
    immediate: asyncio.Event = field(default_factory=asyncio.Event)

    def request(self) -> None:
        (self.immediate if self.graceful.is_set() else self.graceful).set()


def install_stop_signals(shutdown: Shutdown) -> None:
    """A stop signal requests the next phase of `shutdown` (for processes that own no children)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, shutdown.request)


class StopRequests:
    """Stop signals counted instead of raised, for a process that must stop what it started.

    A KeyboardInterrupt can land anywhere: between starting an engine and remembering it, or in the
    middle of stopping one, so a second Ctrl-C would leave engines behind. A count is read where the
    code can act on it. The handler stays installed from start-up to the last clean-up step (asyncio's
    own handlers restore the default ones when its loop closes, which would reopen that window).
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[signal.Signals, object] = {}
        self._listener: Callable[[], object] | None = None

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]

    def requested(self) -> bool:
        return self.count > 0

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self._listener is not None:
            self._listener()

    def drive(self, shutdown: Shutdown) -> None:
        """Requests from now on also advance `shutdown` in the running loop; so do those already made.

        The handler runs in the main thread between bytecodes (Linux delivers a process's signal to its
        main thread unless that thread blocks it), so it hands the request to the loop thread-safely.
        """
        loop = asyncio.get_running_loop()
        self._listener = lambda: loop.call_soon_threadsafe(shutdown.request)
        for _ in range(min(self.count, 2)):
            shutdown.request()

    def release(self) -> None:
        self._listener = None

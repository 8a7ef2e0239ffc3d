"""LISTEN/NOTIFY wake-ups. They are hints only: every waiter also polls, so a lost notification
(or a database restart that drops the listening connection) delays work but never loses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from service.core import repository

log = logging.getLogger(__name__)

INTENTS_CHANNEL = "profiles_intents"
FINISHED_CHANNEL = "profiles_intent_finished"
# A bulk replay was asked for (queries.sql: submit_replay_job).
REPLAY_JOBS_CHANNEL = "profiles_replay_jobs"
CONNECT_TIMEOUT_SECONDS = 3.0


def due_time(payload: str) -> datetime | None:
    """When the intent a notice on INTENTS_CHANNEL names became due ("<id> <epoch seconds>", as
    queries.sql's accept_put sends it), or None for a notice that does not say (one from a release
    before notices did)."""
    _, _, epoch = payload.partition(" ")
    try:
        return datetime.fromtimestamp(float(epoch), UTC)
    except (ValueError, OverflowError, OSError):
        return None


class Listener:
    """A dedicated connection listening on one channel, reconnected on demand."""

    def __init__(self, dsn: str, channel: str, on_notify: Callable[[str], None]) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_notify = on_notify
        self._conn: repository.Connection | None = None
        self._connecting = asyncio.Lock()

    def _callback(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._on_notify(str(payload))

    async def ensure(self) -> bool:
        """Listen if not listening yet; False while the database cannot be reached."""
        async with self._connecting:
            return await self._connect()

    async def _connect(self) -> bool:
        if self._conn is not None and not self._conn.is_closed():
            return True
        try:
            self._conn = await repository.connect(self._dsn, timeout=CONNECT_TIMEOUT_SECONDS)
            await self._conn.add_listener(self._channel, self._callback)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.debug("cannot listen on %s yet: %s", self._channel, exc)
            self._conn = None
            return False
        return True

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self._conn.close(timeout=2)
            self._conn = None


class FinishWaiter:
    """Lets requests wait for their intent to finish (Prefer: wait) without polling tightly."""

    def __init__(self, dsn: str, poll_interval: float) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._poll_interval = poll_interval
        self.listener = Listener(dsn, FINISHED_CHANNEL, self._wake)

    def _wake(self, intent_id: str) -> None:
        for event in self._events.get(intent_id, ()):
            event.set()

    async def wait(self, intent_id: str, timeout: float, finished: Callable[[], Awaitable[bool]]) -> bool:
        """Wait up to `timeout` seconds until `finished()` says so; True if it did in time."""
        event = asyncio.Event()
        self._events[intent_id].add(event)
        try:
            async with asyncio.timeout(timeout):
                await self.listener.ensure()
                while True:
                    event.clear()
                    if await finished():
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), self._poll_interval)
        except TimeoutError:
            return False
        finally:
            self._events[intent_id].discard(event)
            if not self._events[intent_id]:
                del self._events[intent_id]
        return True

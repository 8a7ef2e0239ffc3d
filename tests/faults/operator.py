"""The operator on call: during the chaos, replays stuck intents in bulk and dead ones one by one
through the admin API with an admin token, recording every call in the history."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.faults.chaos import stopped_within
from tests.faults.history import UNREADABLE, AdminAction, AdminCall, History
from tests.faults.load import NO_ANSWER
from tests.support import ADMIN_SCOPE, bearer

ROUND_SECONDS = (0.3, 1.0)  # stuck intents last until a worker's next poll: look often
LIST_LIMIT = 100


class Operator:
    """Each round (until the chaos stops): one bulk replay of the stuck intents, then a listing of
    the dead ones and a replay of each. Answers 503 (an outage) or 409 (a worker or another replay
    got there first) are what an operator sees during an incident: the next round tries again."""

    def __init__(
        self,
        api_urls: Sequence[str],
        history: History,
        seed: int,
        client_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apis = list(api_urls)
        self._history = history
        self._rng = random.Random(seed + 1)  # its own stream: the load's draws stay as they were
        self._timeout = aiohttp.ClientTimeout(total=client_timeout)
        self._clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while not await stopped_within(stop, self._rng.uniform(*ROUND_SECONDS)):
                await self._replay_stuck(session)
                for intent_id in await self._list_dead(session):
                    if stop.is_set():
                        break
                    await self._replay(session, intent_id)

    async def _replay_stuck(self, session: aiohttp.ClientSession) -> None:
        call = await self._call(
            session, AdminAction.REPLAY_STUCK, "POST", "/v1/admin/intents/replay", {"state": "stuck"}
        )
        if call.status == 200:
            items = _items(call.body, "intents")
            self._record(call, tuple(str(i.get("intent_id")) for i in items), tuple(_outcome(i) for i in items))
        else:
            self._record(call)

    async def _list_dead(self, session: aiohttp.ClientSession) -> list[str]:
        path = f"/v1/admin/intents?state=dead&limit={LIST_LIMIT}"
        call = await self._call(session, AdminAction.LIST_DEAD, "GET", path)
        listed = tuple(str(i.get("intent_id")) for i in _items(call.body, "items")) if call.status == 200 else ()
        self._record(call, listed)
        return list(listed)

    async def _replay(self, session: aiohttp.ClientSession, intent_id: str) -> None:
        call = await self._call(session, AdminAction.REPLAY, "POST", f"/v1/admin/intents/{intent_id}/replay")
        if call.status == 200:
            self._record(call, (intent_id,), (_outcome(call.body),))
        elif call.status == 409:
            # A refusal names its reason as the first field error.
            errors = _items(call.body, "errors")
            self._record(call, (intent_id,), (_outcome(errors[0], "message") if errors else UNREADABLE,))
        else:
            self._record(call, (intent_id,))

    async def _call(
        self, session: aiohttp.ClientSession, action: AdminAction, method: str, path: str, body: Any = None
    ) -> _Answer:
        url = self._apis[self._rng.randrange(len(self._apis))] + path
        # Minted for each call, as a token helper would keep one fresh.
        headers = bearer("fault-operator", scope=ADMIN_SCOPE)
        start = self._clock()
        try:
            async with session.request(method, url, json=body, headers=headers) as response:
                raw = await response.read()
                return _Answer(action, start, self._clock(), response.status, _json(raw))
        except NO_ANSWER:
            return _Answer(action, start, self._clock(), None, None)

    def _record(self, answer: _Answer, intents: tuple[str, ...] = (), outcomes: tuple[str, ...] = ()) -> None:
        self._history.admin.append(AdminCall(answer.action, answer.start, answer.end, answer.status, intents, outcomes))


@dataclass(frozen=True)
class _Answer:
    action: AdminAction
    start: float
    end: float
    status: int | None
    body: Any  # the JSON answer, None if there was none


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _items(body: Any, name: str) -> list[dict[str, Any]]:
    found = body.get(name) if isinstance(body, dict) else None
    return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []


def _outcome(body: Any, name: str = "outcome") -> str:
    value = body.get(name) if isinstance(body, dict) else None
    return value if isinstance(value, str) else UNREADABLE

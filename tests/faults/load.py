"""Writers and readers over HTTP against every API process, recording each operation in the history."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from tests.faults.history import Delete, History, Read, Seen, Write
from tests.support import png, upload_form

# Failures that mean "no answer": the API was killed, paused past our patience, or refused the connection.
NO_ANSWER = (aiohttp.ClientError, TimeoutError)
DELETE_SHARE = 0.05


def users(count: int) -> list[str]:
    return [f"fault-u{n}" for n in range(count)]


class Load:
    """Writers (a unique token and unique image bytes per write, a few deletes) and readers, all on
    a small set of users so that they contend; each operation is timed with the monotonic clock."""

    def __init__(
        self,
        api_urls: Sequence[str],
        user_ids: Sequence[str],
        seed: int,
        client_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history = History()
        self._clock = clock
        self._apis = list(api_urls)
        self._users = list(user_ids)
        self._rng = random.Random(seed)
        self._timeout = aiohttp.ClientTimeout(total=client_timeout)
        self._sequence = itertools.count(1)

    async def run(self, stop: asyncio.Event, writers: int, readers: int) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            await asyncio.gather(
                *(self._writer(session, stop) for _ in range(writers)),
                *(self._reader(session, stop) for _ in range(readers)),
            )

    async def final_reads(self) -> None:
        """One read of every user through every API once everything is up and drained."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            for user in self._users:
                for api in range(len(self._apis)):
                    await self._read(session, api, user)

    async def _writer(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            api, user = self._rng.randrange(len(self._apis)), self._rng.choice(self._users)
            if self._rng.random() < DELETE_SHARE:
                await self._delete(session, api, user)
            else:
                await self._put(session, api, user)
            await asyncio.sleep(self._rng.uniform(0.05, 0.25))

    async def _reader(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._read(session, self._rng.randrange(len(self._apis)), self._rng.choice(self._users))
            await asyncio.sleep(self._rng.uniform(0.01, 0.06))

    async def _put(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        n = next(self._sequence)
        token, image = f"{user}-w{n:06d}", png(n)
        url = f"{self._apis[api]}/v1/profiles/{user}"
        # aiohttp resends a PUT once on a broken keep-alive connection; the key makes a resend of
        # a write that was already accepted return its first answer instead of a second version.
        headers = {"Idempotency-Key": token}
        start = self._clock()
        status: int | None = None
        body: dict[str, Any] = {}
        end: float | None = None
        try:
            async with session.put(url, data=upload_form({"display_name": token}, image), headers=headers) as response:
                raw = await response.read()
                status, end = response.status, self._clock()
            if status == 202:
                body = _json(raw) or {}
        except NO_ANSWER:
            status, end = None, None
        self.history.writes.append(
            Write(
                user=user,
                token=token,
                image_sha=hashlib.sha256(image).hexdigest(),
                start=start,
                end=end,
                status=status,
                version=body.get("version"),
                intent_id=body.get("intent_id"),
            )
        )

    async def _delete(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        start = self._clock()
        status: int | None = None
        end: float | None = None
        try:
            async with session.delete(f"{self._apis[api]}/v1/profiles/{user}") as response:
                await response.read()
                status, end = response.status, self._clock()
        except NO_ANSWER:
            pass
        self.history.deletes.append(Delete(user, start, end, status))

    async def _read(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        start = self._clock()
        status: int | None = None
        seen: Seen | None = None
        try:
            async with session.get(f"{self._apis[api]}/v1/profiles/{user}?embed=image") as response:
                raw = await response.read()
                status = response.status
            if status == 200:
                seen = _seen(_json(raw))
        except NO_ANSWER:
            status = None
        self.history.reads.append(Read(user, api, start, self._clock(), status, seen))


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _seen(body: dict[str, Any] | None) -> Seen | None:
    """The pair a 200 carried; None if the body is not a whole profile (the checker reports that)."""
    if body is None:
        return None
    try:
        data = base64.b64decode(body["image"]["data"], validate=True)
        return Seen(
            user=body["user_id"],
            version=int(body["version"]),
            token=body["metadata"]["display_name"],
            image_sha=hashlib.sha256(data).hexdigest(),
            declared_sha=body["image"]["sha256"],
        )
    except (KeyError, TypeError, ValueError, binascii.Error):
        return None

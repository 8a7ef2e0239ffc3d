"""Writers and readers over HTTP against every API process, recording each operation in the history."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from PIL import Image

from tests.faults.history import Delete, History, Read, Route, Seen, Write
from tests.support import bearer, upload_form

# Failures that mean "no answer": the API was killed, paused past our patience, or refused the connection.
NO_ANSWER = (aiohttp.ClientError, TimeoutError)
# A writer deletes the user it has just written, often while that write is still pending: the
# write must then never go live.
DELETE_SHARE = 0.1
VERSION_READ_SHARE = 0.35
VARIANT_READ_SHARE = 0.2
RECENT_VERSIONS = 4  # version reads ask for one of a user's latest accepted versions


def users(count: int) -> list[str]:
    return [f"fault-u{n}" for n in range(count)]


def colour_of_write(n: int) -> tuple[int, int, int]:
    """A colour per write, spread over the cube so that neighbours are far apart."""
    digest = hashlib.sha256(n.to_bytes(8, "big")).digest()
    return digest[0], digest[1], digest[2]


def write_image(n: int) -> bytes:
    """A small PNG of write n's colour, unique in its bytes by one corner pixel."""
    image = Image.new("RGB", (32, 24), colour_of_write(n))
    image.putpixel((0, 0), (n % 256, (n // 256) % 256, (n // 65536) % 256))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def centre_colour(data: bytes) -> tuple[int, int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            r, g, b = rgb.getpixel((rgb.width // 2, rgb.height // 2))  # type: ignore[misc]
    except (OSError, ValueError):
        return None
    return r, g, b


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
        self._accepted: defaultdict[str, list[int]] = defaultdict(list)  # versions named by 202s, per user

    async def run(self, stop: asyncio.Event, writers: int, readers: int) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            await asyncio.gather(
                *(self._writer(session, stop) for _ in range(writers)),
                *(self._reader(session, stop) for _ in range(readers)),
            )

    async def final_reads(self) -> None:
        """Once everything is up and drained, every user and its latest versions through every API."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            for user in self._users:
                for api in range(len(self._apis)):
                    await self._read(session, api, user)
                    await self._read_variant(session, api, user)
                    for version in self._accepted[user][-RECENT_VERSIONS:]:
                        await self._read_version(session, api, user, version)

    async def _writer(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        last: str | None = None
        while not stop.is_set():
            api = self._rng.randrange(len(self._apis))
            if last is not None and self._rng.random() < DELETE_SHARE:
                await self._delete(session, api, last)
            else:
                last = self._rng.choice(self._users)
                await self._put(session, api, last)
            await asyncio.sleep(self._rng.uniform(0.05, 0.25))

    async def _reader(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            api, user = self._rng.randrange(len(self._apis)), self._rng.choice(self._users)
            recent = self._accepted[user][-RECENT_VERSIONS:]
            choice = self._rng.random()
            if recent and choice < VERSION_READ_SHARE:
                await self._read_version(session, api, user, self._rng.choice(recent))
            elif choice > 1 - VARIANT_READ_SHARE:
                await self._read_variant(session, api, user)
            else:
                await self._read(session, api, user)
            await asyncio.sleep(self._rng.uniform(0.01, 0.06))

    async def _put(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        n = next(self._sequence)
        token, image = f"{user}-w{n:06d}", write_image(n)
        url = f"{self._apis[api]}/v1/profiles/{user}"
        # aiohttp resends a PUT once on a broken keep-alive connection; the key makes a resend of
        # a write that was already accepted return its first answer instead of a second version.
        headers = {"Idempotency-Key": token, **bearer(user)}
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
        if isinstance(body.get("version"), int):
            self._accepted[user].append(body["version"])
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
                colour=colour_of_write(n),
            )
        )

    async def _delete(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        start = self._clock()
        status: int | None = None
        end: float | None = None
        try:
            async with session.delete(f"{self._apis[api]}/v1/profiles/{user}", headers=bearer(user)) as response:
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

    async def _read_version(self, session: aiohttp.ClientSession, api: int, user: str, version: int) -> None:
        start = self._clock()
        status: int | None = None
        seen: Seen | None = None
        try:
            async with session.get(f"{self._apis[api]}/v1/profiles/{user}/versions/{version}/image") as response:
                raw = await response.read()
                status = response.status
            if status == 200:
                etag = response.headers.get("ETag", "").strip('"')
                seen = Seen(user, version, None, hashlib.sha256(raw).hexdigest(), etag)
        except NO_ANSWER:
            status = None
        self.history.reads.append(Read(user, api, start, self._clock(), status, seen, Route.VERSION_IMAGE, version))

    async def _read_variant(self, session: aiohttp.ClientSession, api: int, user: str) -> None:
        """The profile's description of its first variant, then that variant's bytes by its URL."""
        start = self._clock()
        status: int | None = None
        seen: Seen | None = None
        try:
            async with session.get(f"{self._apis[api]}/v1/profiles/{user}") as response:
                raw = await response.read()
                status = response.status
            body = _json(raw) if status == 200 else None
            described = _first_variant(body)
            if body is not None and described is None:
                status = None  # a profile without variants: recorded as no answer, the rules ignore it
            if body is not None and described is not None:
                async with session.get(f"{self._apis[api]}{described['url']}") as response:
                    data = await response.read()
                    status = response.status
                if status == 200:
                    seen = Seen(
                        user=body["user_id"],
                        version=int(body["version"]),
                        token=body["metadata"]["display_name"],
                        image_sha=hashlib.sha256(data).hexdigest(),
                        declared_sha=described["sha256"],
                        colour=centre_colour(data),
                    )
        except NO_ANSWER:
            status = None
        except (KeyError, TypeError, ValueError):
            seen = None  # an answer that is not a whole profile: a 200 without data, reported
        self.history.reads.append(Read(user, api, start, self._clock(), status, seen, Route.VARIANT))


def _first_variant(body: dict[str, Any] | None) -> dict[str, Any] | None:
    variants = body.get("variants") if body is not None else None
    if not isinstance(variants, dict) or not variants:
        return None
    first = next(iter(variants.values()))
    return first if isinstance(first, dict) else None


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

"""Helpers shared by the tests: engines, payloads, API calls, waiting for intents and conditions,
worker processes, store snapshots."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from service.api.state import SETTINGS
from service.core import repository
from service.core.blobstore import open_blob_store
from service.core.domain import FINISHED_STATES
from service.core.notifications import FINISHED_CHANNEL
from service.core.repository import Claim, Finished
from service.core.settings import ImageDelivery, Settings
from service.core.variants import render_variants
from service.dev.embedded import remove_orphaned_clusters
from workers.outbox import Worker

ROOT = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 30.0
T = TypeVar("T")

# A client of an in-process API instance (the `client` and `make_client` fixtures).
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[Settings], Awaitable[Client]]

# What an empty test database holds: the tables a request writes to, by row count.
EMPTY = {"profiles": 0, "versions": 0, "intents": 0, "staged_images": 0, "idempotency_keys": 0}


class StartWorker(Protocol):
    """The `start_worker` fixture: an in-process worker with the test's settings, or `custom` ones."""

    async def __call__(self, custom: Settings | None = None) -> None: ...


@dataclass(frozen=True)
class Engines:
    """The PostgreSQL server (its admin URL) and the S3 endpoint the session tests against."""

    admin_url: str
    s3_endpoint_url: str
    source: str


def database_url(admin_url: str, database: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{database}"))


# Settings of a system the tests talk to without tokens and at full speed: auth and rate limits
# have their own tests (test_auth.py, test_hostile_input.py); the others exercise the rules behind them.
OPEN_DEVELOPMENT: dict[str, Any] = {
    "mode": "development",
    "write_rate_per_user_per_minute": 0,
    "write_rate_per_ip_per_minute": 0,
}
JWT_SECRET = "test-only-hs256-secret-0123456789abcdef"
ADMIN_SCOPE = "profiles:admin"


def token(subject: str, *, scope: str = "", secret: str = JWT_SECRET, lifetime: float = 300, **claims: Any) -> str:
    """An HS256 access token as an issuer would mint it (claims override the defaults)."""
    now = int(time.time())
    payload = {"sub": subject, "iat": now, "exp": now + int(lifetime), "scope": scope} | claims
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(subject: str, **options: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject, **options)}"}


def png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small PNG whose bytes differ for every seed."""
    image = Image.new("RGB", size, (seed % 256, (seed // 256) % 256, (seed // 65536) % 256))
    image.putpixel((0, 0), (seed * 7 % 256, seed * 13 % 256, 1))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=None)
    return out.getvalue()


def upload_form(
    metadata: Any, image: bytes, *, image_name: str = "avatar.png", extra: dict[str, bytes] | None = None
) -> aiohttp.FormData:
    form = aiohttp.FormData()
    meta = metadata if isinstance(metadata, str) else json.dumps(metadata)
    form.add_field("metadata", meta, content_type="application/json")
    form.add_field("image", image, filename=image_name, content_type="image/png")
    for name, value in (extra or {}).items():
        form.add_field(name, value, filename=f"{name}.bin")
    return form


async def put_profile(
    client: Client, user_id: str, metadata: Any, image: bytes, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    return await client.put(f"/v1/profiles/{user_id}", data=upload_form(metadata, image), headers=headers)


async def accepted(
    client: Client, user: str, metadata: dict[str, Any], image: bytes, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """A PUT that must be accepted (202); its body."""
    response = await put_profile(client, user, metadata, image, headers)
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def published(client: Client, user: str, display_name: str, image: bytes) -> dict[str, Any]:
    """A PUT that must go live while the request waits (a worker must be running); the profile body."""
    response = await put_profile(client, user, {"display_name": display_name}, image, {"Prefer": "wait=20"})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def delivering(settings: Settings, delivery: ImageDelivery, **overrides: Any) -> Settings:
    """`settings` with image bytes sent by the API (proxy) or by the blob store it redirects to."""
    return settings.model_copy(update={"image_delivery": delivery, **overrides})


async def assert_problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """A refusal with `status` and a complete problem+json body; the body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body


async def live_version(client: Client, user: str) -> int | None:
    response = await client.get(f"/v1/profiles/{user}")
    if response.status != 200:
        return None
    version: int = (await response.json())["version"]
    return version


async def live_pair(client: Client, user: str) -> tuple[int, str, bytes] | None:
    """The live version of `user` with its display name and image bytes, read in one request; None
    while no version is live."""
    response = await client.get(f"/v1/profiles/{user}?embed=image")
    if response.status != 200:
        return None
    body = await response.json()
    return body["version"], body["metadata"]["display_name"], base64.b64decode(body["image"]["data"])


async def wait_live(client: Client, user: str, version: int) -> None:
    """Until the API serves `version` of `user`: a version goes live when its intent finishes."""

    async def is_live() -> bool:
        return await live_version(client, user) == version

    database = client.app[SETTINGS].database_url
    await until_intents_finish(database, is_live, what=f"{user} v{version} live")


async def status_line_before_body(client: Client, user_id: str, content_length: int) -> bytes:
    """Send only the head of an upload announcing `content_length` bytes; the status line the
    server answers without waiting for the body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT /v1/profiles/{user_id} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {content_length}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def until_intents_finish(
    database_url: str,
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    intent_id: str | None = None,
    timeout: float = WAIT_SECONDS,
) -> T:
    """Await `check` again each time an intent finishes (only `intent_id`, if given), until it returns
    something truthy. It listens before the first check, so a notification sent between that check
    and the wait is not missed."""
    woken = asyncio.Event()

    def wake(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if intent_id is None or payload == intent_id:
            woken.set()

    deadline = asyncio.timeout(timeout)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(FINISHED_CHANNEL, wake)
        async with deadline:
            while True:
                woken.clear()
                if result := await check():
                    return result
                await woken.wait()
    except TimeoutError:
        if deadline.expired():
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
        raise
    finally:
        await conn.close()


async def finished_intent(database_url: str, intent_id: str, timeout: float = WAIT_SECONDS) -> asyncpg.Record:
    """The intent's row once it is done, superseded or dead."""

    async def finished() -> asyncpg.Record | None:
        row = await intent_row(database_url, intent_id)
        return row if row["state"] in FINISHED_STATES else None

    return await until_intents_finish(
        database_url, finished, what=f"intent {intent_id} to finish", intent_id=intent_id, timeout=timeout
    )


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float = WAIT_SECONDS,
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy: only for changes nothing notifies of (a lock
    wait, a server coming back, an in-process counter, the bucket); an intent finishing has
    `until_intents_finish`."""
    deadline = time.monotonic() + timeout
    while True:
        if result := await check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def until_blocked(pool: repository.Pool, *, what: str, statement: str = "", wait_event: str | None = None) -> int:
    """The backend (pid) of a session of this database waiting for a lock (`wait_event`: 'transactionid',
    'advisory', …; any if None) in a statement whose text (as far as pg_stat_activity keeps it: 1 kB)
    contains `statement`. Polled from its own connection: PostgreSQL notifies nobody when a session
    starts to wait, and a transaction would see pg_stat_activity as of its first read of it."""

    async def blocked() -> int | None:
        pid: int | None = await pool.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND ($1::text IS NULL OR wait_event = $1) AND strpos(query, $2) > 0 LIMIT 1",
            wait_event,
            statement,
        )
        return pid

    return await eventually(blocked, what=what)


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment, with its PROFILES_* variables replaced by `settings`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")} | settings.environment()


class WorkerProcess:
    """`profiles worker` as a real child process, with its log lines readable by the test."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()

    async def start(self) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            env=settings_env(self._settings),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        # Its start is announced only on stderr (no metrics port unless asked for one).
        await self._wait_for_line(r"worker .* started")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new_line.set()

    async def _wait_for_line(self, pattern: str, timeout: float = WAIT_SECONDS) -> str:
        regex = re.compile(pattern)
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"worker exited before logging {pattern!r}: {self.lines[-5:]}")
                self._new_line.clear()
                await self._new_line.wait()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> int:
        """SIGTERM, then wait for a clean exit."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), WAIT_SECONDS)
        if self._reader is not None:
            await self._reader
        return code


async def intent_row(database_url: str, intent_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM intents WHERE id = $1", intent_id)
    finally:
        await conn.close()
    assert row is not None
    return row


async def blob_key(database_url: str, user: str, version: int) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        key: str = await conn.fetchval(
            "SELECT blob_key FROM versions WHERE user_id = $1 AND version = $2", user, version
        )
    finally:
        await conn.close()
    return key


async def version_keys(database_url: str, user: str, version: int) -> set[str]:
    """Every blob key a version names now: its image's and its variants'."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT blob_key FROM version_blobs WHERE user_id = $1 AND version = $2", user, version)
    finally:
        await conn.close()
    return {row["blob_key"] for row in rows}


async def live_keys(pool: repository.Pool) -> set[str]:
    """The keys of the blobs that profiles show now: images and variants."""
    rows = await pool.fetch(
        "SELECT b.blob_key FROM profiles p JOIN version_blobs b ON b.user_id = p.user_id AND b.version = p.live_version"
    )
    return {row["blob_key"] for row in rows}


async def table_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        tables = ["profiles", "versions", "intents", "staged_images", "idempotency_keys"]
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}
    finally:
        await conn.close()


async def kill_pending(pool: repository.Pool) -> None:
    """Every pending intent dead, as exhausted attempts leave one (its staged bytes kept, for replay)."""
    await pool.execute(
        "UPDATE intents SET state = 'dead', attempts = max_attempts, last_error = 'S3 outage' WHERE state = 'pending'"
    )


async def let_grace_pass(pool: repository.Pool, grace_seconds: float) -> None:
    """What the database clock would show once the grace period of every scheduled deletion is
    over: a collector sighted each one (as every collection round does first), that long ago."""
    await repository.sight_blob_deletions(pool)
    await pool.execute(
        "UPDATE blob_deletions SET seen_at = seen_at - make_interval(secs => $1) WHERE state = 'scheduled'",
        grace_seconds + 1,
    )


def made(claim: Claim) -> Finished:
    """A claim as the worker publishes it once its uploads are done: with the variants it made
    (rendered here from its staged bytes; the publish checks keys and fences, not the bucket)."""
    assert claim.data is not None
    wanted = [(upload.spec, upload.format) for upload in claim.variants]
    return Finished(claim, tuple(render_variants(claim.data, wanted)))


async def publish_due(settings: Settings) -> int:
    """Process every intent due now with an in-process worker, one claim at a time; returns how many."""
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=2, timeout=5)
    done = 0
    try:
        async with open_blob_store(settings) as blobs:
            worker = Worker(settings, pool, blobs)
            while claims := await repository.claim_intents(pool, 10, worker.name, settings.lease_seconds):
                for claim in claims:
                    await worker.process(claim)
                    done += 1
    finally:
        await pool.close()
    return done


class HangingS3:
    """An S3 endpoint that accepts connections, reads the first line of each request and never answers."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[str] = []
        self._arrived = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> HangingS3:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        self.requests.append((await reader.readline()).decode(errors="replace"))
        self._arrived.set()

    async def requested(self, fragment: str, timeout: float = WAIT_SECONDS) -> str:
        """The first request line containing `fragment` (a key, say), once one has arrived."""
        try:
            async with asyncio.timeout(timeout):
                while not (found := [line for line in self.requests if fragment in line]):
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no request for {fragment} within {timeout}s: {self.requests}") from None
        return found[0]

    def close(self) -> None:
        for writer in self._held:
            writer.close()
        if self._server is not None:
            self._server.close()


def remove_engine_data(folder: Path) -> None:
    """Remove a folder that engines kept their data in; as root, their clusters live in the engine
    home and go with it (a `profiles dev` child cannot remove them: the folder outlives it)."""
    shutil.rmtree(folder, ignore_errors=True)
    remove_orphaned_clusters()


# Browser tests drive the system's Chromium through its matching chromedriver (Debian's `chromium` and
# `chromium-driver`): nothing is downloaded at run time. CI must not pass without them.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
SCREENSHOTS = ROOT / ".artifacts" / "screenshots"


def find_browser() -> tuple[str, str] | None:
    """The paths of a Chromium and its chromedriver, or None when either is missing."""
    browser = next((found for name in BROWSER_NAMES if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return None if browser is None or driver is None else (browser, driver)


@dataclass
class Browser:
    """A headless Chromium for async tests: the page talks to a server on the test's event loop, so every
    WebDriver call runs in a thread and the loop keeps answering."""

    driver: Any

    async def call(self, action: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(action, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def screenshot(self, name: str) -> Path:
        """Saves the page as .artifacts/screenshots/<name>.png, for people to look at."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        await self.call(self.driver.save_screenshot, str(path))
        return path


class StallingS3:
    """A proxy in front of the real S3 endpoint that passes every request on, except those whose
    path contains `stall_on`: those are held unanswered (as a store that stopped answering), or only
    the first `times` of them (as one connection that hung while the store kept answering)."""

    def __init__(self, upstream: str, stall_on: str, *, times: int | None = None) -> None:
        self.url = ""
        self._upstream = upstream.rstrip("/")
        self._stall_on = stall_on
        self._stalls_left = times
        self.stalled = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> StallingS3:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._forward)
        # A held request never ends by itself: shutting down does not wait for it.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self._stall_on in request.path and self._stalls_left != 0:
            if self._stalls_left is not None:
                self._stalls_left -= 1
            self.stalled.set()
            await asyncio.Event().wait()
        assert self._session is not None
        # The Host header goes on as it came: the request is signed with it.
        async with self._session.request(
            request.method,
            f"{self._upstream}{request.path_qs}",
            headers=request.headers,
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            framing = ("transfer-encoding",) if request.method == "HEAD" else ("transfer-encoding", "content-length")
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in framing}
            return web.Response(status=answer.status, headers=headers, body=body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


# A WebP variant of a solid colour comes back within this of each channel.
LOSSY = 12


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (300, 200), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def colour_of(data: bytes) -> tuple[int, ...]:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        return tuple(rgb.getpixel((rgb.width // 2, rgb.height // 2)))  # type: ignore[arg-type]


def close_to(seen: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return all(abs(a - b) <= LOSSY for a, b in zip(seen, expected, strict=True))

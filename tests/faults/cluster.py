"""The system under fault: its own embedded PostgreSQL and SeaweedFS in a temporary folder, and the
API and worker processes, each in a slot that faults and a supervisor restart like a process manager."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from service.core.blobstore import open_blob_store
from service.core.migrate import migrate
from service.core.settings import Settings
from service.dev.embedded import EmbeddedPostgres, EmbeddedS3, free_port
from tests.support import JWT_SECRET, OPEN_DEVELOPMENT, ROOT, settings_env

BUCKET = "profiles-faults"
START_SECONDS = 60.0  # how long a slot keeps trying to start (PostgreSQL may be restarting meanwhile)
STOP_SECONDS = 15.0
SUPERVISE_EVERY = 0.5
LOG_TAIL = 40
ERROR_LINES_KEPT = 200
LINE_LIMIT = 1024 * 1024  # a JSON log line carries its whole traceback


def fault_settings(database_url: str, s3_endpoint_url: str) -> Settings:
    """Short timings so that leases expire, retries happen and blobs are collected within seconds."""
    return Settings(
        database_url=database_url,
        s3_endpoint_url=s3_endpoint_url,
        s3_bucket=BUCKET,
        s3_key_prefix="images/",
        request_timeout_seconds=5.0,
        lease_seconds=3.0,
        attempt_timeout_seconds=1.5,
        # Two attempts: an S3 outage or a lost lease kills intents, so that the operator has dead
        # ones to replay and a claim sometimes kills an intent that a replay is about to take.
        max_attempts=2,
        retry_base_seconds=0.1,
        retry_max_seconds=1.0,
        poll_interval_seconds=0.2,
        worker_concurrency=4,
        gc_grace_seconds=6.0,  # just above the request deadline, the validator's minimum
        gc_interval_seconds=1.0,
        reconcile_interval_seconds=10.0,
        worker_metrics_port=0,
        db_pool_max_size=5,
        db_acquire_timeout_seconds=1.0,
        retry_after_seconds=1,
        # Writers carry their owner's token and the operator an admin token; rate limits are off
        # (the load would mostly be answered 429).
        **OPEN_DEVELOPMENT,
        auth_jwt_secret=SecretStr(JWT_SECRET),
    )


class ErrorLines:
    """The ERROR lines of one slot's processes, across restarts: all counted, the latest kept."""

    def __init__(self) -> None:
        self.count = 0
        self.kept: collections.deque[str] = collections.deque(maxlen=ERROR_LINES_KEPT)

    def add(self, line: str) -> None:
        self.count += 1
        self.kept.append(line)


class ChildFailed(RuntimeError):
    """A child process exited, or did not say it was ready, while starting."""


class Child:
    """One `profiles api` or `profiles worker` process; keeps the tail of its log for diagnosis."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict[str, str], errors: ErrorLines) -> None:
        self.name = name
        self.errors = errors
        self._args = args
        self._ready_pattern = re.compile(ready)
        self._env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            *self._args,
            env=self._env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=LINE_LIMIT,
        )
        self._reader = asyncio.create_task(self._read())
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self._reader}, timeout=START_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            await self.kill()
            raise ChildFailed(f"{self.name} did not start: {' | '.join(list(self.tail)[-3:])}")

    async def _read(self) -> None:
        # Drained all the time: a child blocked on a full stderr pipe would look like a hang.
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            try:
                line = await self.proc.stderr.readline()
            except ValueError:  # a line beyond LINE_LIMIT is dropped; the pipe keeps draining
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            error = _error_summary(text, self.name)
            if error is not None:
                self.errors.add(error)
            if not self._ready.is_set() and self._ready_pattern.search(text):
                self._ready.set()

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL if it does not exit in time."""
        if self.running:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            assert self.proc is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        await self.kill()


def _error_summary(line: str, name: str) -> str | None:
    """An ERROR line of a child's JSON log in one line: when, who, what, and the exception it ended with."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("level") not in ("ERROR", "CRITICAL"):
        return None
    cause = str(record.get("exc_info") or "").strip().splitlines()[-1:]
    return " | ".join([str(record.get("time")), name, str(record.get("message")), *cause])


class Slot:
    """A place for one process: faults and the supervisor take its lock, so never both at once."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict[str, str], url: str = "") -> None:
        self.name = name
        self.url = url  # an API's base URL
        self.errors = ErrorLines()
        self._args, self._ready, self._env = args, ready, env
        self.lock = asyncio.Lock()
        self.child: Child | None = None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    async def start(self) -> None:
        """Start the process, retrying while it fails (e.g. PostgreSQL is being restarted)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            child = Child(self.name, self._args, self._ready, self._env, self.errors)
            try:
                await child.start()
            except ChildFailed:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
                continue
            self.child = child
            return

    def signal(self, sig: signal.Signals) -> None:
        if self.child is not None:
            self.child.signal(sig)

    async def kill(self) -> None:
        if self.child is not None:
            await self.child.kill()

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()


@dataclass
class Cluster:
    root: Path
    postgres: EmbeddedPostgres
    s3: EmbeddedS3
    settings: Settings
    apis: list[Slot]
    workers: list[Slot]
    postgres_lock: asyncio.Lock
    s3_lock: asyncio.Lock
    unplanned_exits: Counter[str]

    @property
    def api_urls(self) -> list[str]:
        return [slot.url for slot in self.apis]

    @property
    def slots(self) -> list[Slot]:
        return [*self.apis, *self.workers]

    async def supervise(self) -> None:
        """Restart any process that exited on its own (faults hold the lock while they restart theirs)."""
        while True:
            await asyncio.sleep(SUPERVISE_EVERY)
            for slot in self.slots:
                if slot.running or slot.lock.locked():
                    continue
                async with slot.lock:
                    if not slot.running:
                        self.unplanned_exits[slot.name] += 1
                        await slot.start()

    async def heal(self) -> None:
        """Every process up again (the faults restore theirs; this covers anything else)."""
        for slot in self.slots:
            async with slot.lock:
                if not slot.running:
                    await slot.start()

    async def stop_processes(self) -> None:
        await asyncio.gather(*(slot.stop() for slot in self.slots))


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="profiles-faults-"))


async def _prepare_bucket(settings: Settings) -> None:
    async with open_blob_store(settings) as blobs:
        await blobs.ensure_bucket()
        # The first write to a new bucket makes the store allocate volumes, which takes seconds.
        await blobs.put_once("warm-up", b"warm", hashlib.sha256(b"warm").hexdigest(), "text/plain")


def _slots(settings: Settings, apis: int, workers: int) -> tuple[list[Slot], list[Slot]]:
    env = settings_env(settings)
    api_slots = []
    for n in range(apis):
        port = free_port()
        args = ["api", "--host", "127.0.0.1", "--port", str(port)]
        api_slots.append(Slot(f"api-{n}", args, r"API listening", env, url=f"http://127.0.0.1:{port}"))
    worker_slots = [Slot(f"worker-{n}", ["worker"], r"worker .* started", env) for n in range(workers)]
    return api_slots, worker_slots


@contextlib.asynccontextmanager
async def running_cluster(apis: int, workers: int) -> AsyncIterator[Cluster]:
    """Engines, schema, bucket and processes; everything is stopped and removed on the way out."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "faults")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "faults")
    root = _scratch()
    postgres, s3 = EmbeddedPostgres(root / "postgres"), EmbeddedS3(root / "s3")
    api_slots: list[Slot] = []
    worker_slots: list[Slot] = []
    try:
        await asyncio.gather(asyncio.to_thread(postgres.start), asyncio.to_thread(s3.start))
        await asyncio.to_thread(migrate, postgres.url())
        settings = fault_settings(postgres.url(), s3.endpoint_url)
        await _prepare_bucket(settings)
        api_slots, worker_slots = _slots(settings, apis, workers)
        await asyncio.gather(*(slot.start() for slot in [*api_slots, *worker_slots]))
        yield Cluster(root, postgres, s3, settings, api_slots, worker_slots, asyncio.Lock(), asyncio.Lock(), Counter())
    finally:
        await asyncio.gather(*(slot.stop() for slot in [*api_slots, *worker_slots]), return_exceptions=True)
        await asyncio.to_thread(s3.kill)
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(root, ignore_errors=True)

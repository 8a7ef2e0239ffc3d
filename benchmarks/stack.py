"""The system under test: embedded PostgreSQL and S3, and our API and workers as child processes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from service.core.blobstore import open_blob_store
from service.core.migrate import migrate
from service.core.settings import Settings
from service.dev.embedded import EmbeddedPostgres, EmbeddedS3, free_port

ROOT = Path(__file__).resolve().parent.parent
TABLES = "profiles, versions, intents, staged_images, idempotency_keys, blob_deletions, maintenance_runs"


class Stack:
    """Engines for one benchmark run; processes started through it are stopped with it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="profiles-bench-"))
        self.postgres = EmbeddedPostgres(self.dir / "postgres")
        self.s3 = EmbeddedS3(self.dir / "s3")
        self.database = "postgres"
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Stack:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        try:
            self.postgres.start()
            self.s3.start()
            migrate(self.url())
            asyncio.run(self._prepare_bucket())
        except BaseException:
            # __exit__ runs only after a successful __enter__: no engine may outlive a failed start.
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self._procs:
            stop(proc)
        self.s3.kill()
        self.postgres.stop()
        # As root the cluster lives in the engine home; it goes when this process exits, once its folder is gone.
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self) -> str:
        return self.postgres.url(self.database)

    def twin(self, database: str) -> Stack:
        """A copy of this stack's database as it is now, on the same engines: measuring two states in
        turn, each beside the other, puts the shared machine's moods on both alike. Its processes stop
        with this stack; it is never entered itself."""
        asyncio.run(_copy_database(self.postgres.url("template1"), self.database, database))
        twin = copy.copy(self)
        twin.database = database
        return twin

    async def _prepare_bucket(self) -> None:
        async with open_blob_store(self.settings()) as blobs:
            await blobs.ensure_bucket()
            await blobs.put_once("warm-up", b"warm", hashlib.sha256(b"warm").hexdigest(), "text/plain")

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.url(),
            "s3_endpoint_url": self.s3.endpoint_url,
            "worker_metrics_port": 0,
            "log_format": "json",
            "db_pool_max_size": 20,
            # The load comes from one address at thousands of writes a second, and carries no tokens.
            "mode": "development",
            "write_rate_per_user_per_minute": 0,
            "write_rate_per_ip_per_minute": 0,
            # Seeded writes carry fewer variants than the default configuration: the walk that would
            # bring them over is background work no figure measures.
            "variant_backfill_in_flight": 0,
        }
        return Settings(**(values | overrides))

    def env(self, settings: Settings) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")} | settings.environment()

    def spawn(self, module: str, *args: str, settings: Settings | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=self.env(settings or self.settings()),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._procs.append(proc)
        return proc

    def api(self, settings: Settings | None = None) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.spawn("service.cli", "api", "--host", "127.0.0.1", "--port", str(port), settings=settings)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        return proc, url

    async def reset(self) -> None:
        """Empty every table between measurements. Running workers' maintenance jobs may hold a
        lock TRUNCATE needs, in the other order: a deadlock then just means try again."""
        conn = await asyncpg.connect(self.url())
        try:
            for attempt in range(10):
                try:
                    await conn.execute(f"TRUNCATE {TABLES} CASCADE")
                    break
                except asyncpg.exceptions.DeadlockDetectedError:
                    if attempt == 9:
                        raise
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()


async def _copy_database(url: str, source: str, target: str) -> None:
    # A template must have no other session: the workers of a fleet are stopped between figures,
    # and autovacuum's are told to leave by CREATE DATABASE itself.
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')
    finally:
        await conn.close()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_json(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Any:
    """Run a helper process (a load driver or a reference) and read the JSON it prints."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def processes(stack: Stack, module: str, *args: str, settings: list[Settings]) -> Iterator[None]:
    """One process of `module` per item of `settings`, stopped at the end."""
    procs = [stack.spawn(module, *args, settings=each) for each in settings]
    try:
        yield
    finally:
        for proc in procs:
            stop(proc)

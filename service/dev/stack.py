"""`profiles dev`: embedded PostgreSQL and S3, migrations, bucket, API and a worker in one process.

It records how to reach it in `<data dir>/settings.env` (mode 0600) while it runs, so that the other
`profiles` commands find it when PROFILES_DATABASE_URL is not set.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from service.api.app import serve
from service.core.blobstore import open_blob_store
from service.core.lifecycle import Shutdown, StopRequests
from service.core.migrate import MigrationError, migrate
from service.core.settings import Settings
from service.core.tracing import Role, traced
from service.dev.embedded import (
    EmbeddedPostgres,
    EmbeddedS3,
    S3Credentials,
    StartInterrupted,
    free_port,
    require_free_port,
)
from service.dev.stackfile import SETTINGS_FILE, use_stack_environment, write_settings_file
from workers.outbox import run_worker

METRICS_PORT_VARIABLE = "PROFILES_WORKER_METRICS_PORT"


class DevStackInUse(RuntimeError):
    """Another `profiles dev` runs on the same data directory."""


def run_dev(data_dir: Path, host: str, port: int) -> None:
    require_free_port(port, "the API", "choose another with --port", host=host)
    with StopRequests() as stops, _claimed(data_dir.resolve()) as data_dir:
        credentials = S3Credentials.generate()
        postgres, s3 = EmbeddedPostgres(data_dir / "postgres"), EmbeddedS3(data_dir / "s3", credentials=credentials)
        _stop_leftovers(postgres, s3)
        try:
            settings = _start(postgres, s3, credentials, host, stops)
            write_settings_file(data_dir, settings, credentials.access_key, credentials.secret_key)
            print(f"Settings    {data_dir / SETTINGS_FILE}  (for `profiles intents`, `profiles gc`, …)", flush=True)
            migrate(settings.database_url)
            if not stops.requested():
                with traced(settings, Role.DEV):
                    asyncio.run(_serve_all(settings, host, port, stops))
        except (StartInterrupted, MigrationError):
            if not stops.requested():  # a Ctrl-C also reaches dbmate, which then fails
                raise
        finally:
            _stop(postgres, s3, stops)
            (data_dir / SETTINGS_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _claimed(data_dir: Path) -> Iterator[Path]:
    """The data directory, held by this process alone: the lock goes with the process, however it ends."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # settings.env and the logs are private
    with open(os.open(data_dir / "dev.lock", os.O_RDWR | os.O_CREAT, 0o600), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevStackInUse(
                f"{data_dir} is in use by another `profiles dev` (pid {lock.read().strip() or 'unknown'}): "
                "stop that one, or use another --data-dir"
            ) from None
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield data_dir


def _stop_leftovers(postgres: EmbeddedPostgres, s3: EmbeddedS3) -> None:
    """Engines still running on this data directory were left by a `profiles dev` that was killed
    (we hold its lock now): stop them, after checking they are those engines."""
    found = (("PostgreSQL", postgres.stop_leftover()), ("S3", s3.stop_leftover()))
    stopped = [f"{name} (pid {pid})" for name, pid in found if pid]
    if stopped:
        print(f"stopped {' and '.join(stopped)}, left running by a `profiles dev` that was killed", flush=True)


def _start(
    postgres: EmbeddedPostgres, s3: EmbeddedS3, credentials: S3Credentials, host: str, stops: StopRequests
) -> Settings:
    postgres.start(stops.requested)
    print(f"PostgreSQL  {postgres.url()}  (data in {postgres.pgdata})", flush=True)
    s3.start(stops.requested)
    use_stack_environment(
        {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key}
    )
    settings = Settings(
        database_url=postgres.url(),
        s3_endpoint_url=s3.endpoint_url,
        access_log=True,
        mode="development",
        worker_metrics_host=host,
    )
    # The worker's metrics on the API's host: on the configured port, else on any free one (a fixed
    # default would collide with a second `profiles dev` on another data directory).
    if METRICS_PORT_VARIABLE not in os.environ:
        settings = settings.model_copy(update={"worker_metrics_port": free_port(host=host)})
    elif settings.worker_metrics_port:
        choose = f"choose another with {METRICS_PORT_VARIABLE}"
        require_free_port(settings.worker_metrics_port, "the worker's metrics", choose, host=host)
    print(
        f"S3          {s3.endpoint_url}  bucket {settings.s3_bucket}, access key {credentials.access_key}, "
        f"secret key {credentials.secret_key}  (data in {s3.data_dir})",
        flush=True,
    )
    print(f"Auth        {_auth_line(settings)}", flush=True)
    print(f"Rate limits {_rate_limits_line(settings)}", flush=True)
    return settings


def _auth_line(settings: Settings) -> str:
    if settings.auth_jwks_url is not None:
        return f"bearer JWTs (RS256/ES256) with keys from {settings.auth_jwks_url}"
    if settings.auth_jwt_secret is not None:
        return "bearer JWTs (HS256) signed with PROFILES_AUTH_JWT_SECRET"
    return "OFF (development mode): anyone can write any profile and use /v1/admin"


def _console_line(settings: Settings) -> str:
    if settings.auth_enabled:
        return "sign in with a token that has the admin scope"
    return "open, no sign-in: development mode"


def _rate_limits_line(settings: Settings) -> str:
    per_user, per_ip = settings.write_rate_per_user_per_minute, settings.write_rate_per_ip_per_minute
    if not per_user and not per_ip:
        return "OFF (development mode; PROFILES_WRITE_RATE_PER_USER_PER_MINUTE and ..._PER_IP_... set them)"
    return f"{per_user:g} writes/min per profile, {per_ip:g} per client address (0: off)"


async def _serve_all(settings: Settings, host: str, port: int, stops: StopRequests) -> None:
    async with open_blob_store(settings) as blobs:
        await blobs.ensure_bucket()
    shutdown = Shutdown()
    stops.drive(shutdown)
    listening, ready = asyncio.Event(), asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(serve(settings, host, port, shutdown.graceful, listening))
            tasks.create_task(run_worker(settings, shutdown, ready))
            tasks.create_task(_announce(settings, host, port, [listening, ready], shutdown))
    finally:
        stops.release()


async def _announce(settings: Settings, host: str, port: int, ready: list[asyncio.Event], shutdown: Shutdown) -> None:
    """The last lines of the banner, once what they announce answers."""
    await asyncio.gather(*(event.wait() for event in ready))
    if settings.worker_metrics_port:
        print(f"Metrics     http://{host}:{settings.worker_metrics_port}/metrics  (the worker's)", flush=True)
    print(f"Console     http://{host}:{port}/admin/  ({_console_line(settings)})", flush=True)
    print(f"API         http://{host}:{port}  (Ctrl-C stops everything)", flush=True)
    await shutdown.graceful.wait()
    print("stopping: requests and intents in flight finish (Ctrl-C again: at once)…", flush=True)


def _stop(postgres: EmbeddedPostgres, s3: EmbeddedS3, stops: StopRequests) -> None:
    """Runs to the end whatever signals arrive (they are counted, not raised); a further one makes
    PostgreSQL stop at once (SIGKILL to its process group) instead of after its fast shutdown."""
    if not (postgres.running or s3.running):
        return
    before = stops.count
    print("stopping PostgreSQL and the S3 server (Ctrl-C again: at once)…", flush=True)
    # Nothing writes to S3 any more, and it has written every object it acknowledged to its files;
    # its graceful stop would only wait 15 s for its own internal streams.
    s3.kill()
    postgres.stop(hurry=lambda: stops.count > before)
    print("stopped", flush=True)

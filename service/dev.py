"""`profiles dev`: embedded PostgreSQL and S3, migrations, bucket, API and a worker in one process."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from service.api.app import serve
from service.blobstore import open_blob_store
from service.embedded import EmbeddedPostgres, EmbeddedS3, require_free_port
from service.lifecycle import install_stop_signals
from service.migrate import migrate
from service.settings import Settings
from workers.outbox import run_worker

log = logging.getLogger(__name__)


def run_dev(data_dir: Path, host: str, port: int) -> None:
    require_free_port(port, "the API")
    data_dir = data_dir.resolve()
    postgres = EmbeddedPostgres(data_dir / "postgres")
    s3 = EmbeddedS3(data_dir / "s3")
    try:
        postgres.start()
        print(f"PostgreSQL  {postgres.url()}  (data in {postgres.data_dir})", flush=True)
        s3.start()
        print(f"S3          {s3.endpoint_url}  (data in {s3.data_dir})", flush=True)
        # SeaweedFS started without an identity file accepts any credentials.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "dev")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dev")
        settings = Settings(
            database_url=postgres.url(), s3_endpoint_url=s3.endpoint_url, access_log=True, mode="development"
        )
        print(f"Auth        {_auth_line(settings)}", flush=True)
        migrate(settings.database_url)
        asyncio.run(_serve_all(settings, host, port))
    finally:
        print("stopping the S3 server (it takes SeaweedFS about 15 s) and PostgreSQL…", flush=True)
        s3.stop()
        postgres.stop()
        print("stopped", flush=True)


def _auth_line(settings: Settings) -> str:
    if settings.auth_jwks_url is not None:
        return f"bearer JWTs (RS256/ES256) with keys from {settings.auth_jwks_url}"
    if settings.auth_jwt_secret is not None:
        return "bearer JWTs (HS256) signed with PROFILES_AUTH_JWT_SECRET"
    return "OFF (development mode): anyone can write any profile and use /v1/admin"


async def _serve_all(settings: Settings, host: str, port: int) -> None:
    async with open_blob_store(settings) as blobs:
        await blobs.ensure_bucket()
    stop = asyncio.Event()
    install_stop_signals(stop)
    print(f"API         http://{host}:{port}  (Ctrl-C stops everything)", flush=True)
    api_stop, worker_stop = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(serve(settings, host, port, api_stop)),
        asyncio.create_task(run_worker(settings, worker_stop)),
    ]
    await stop.wait()
    api_stop.set()
    worker_stop.set()
    await asyncio.gather(*tasks)

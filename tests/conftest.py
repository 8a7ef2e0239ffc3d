"""Real PostgreSQL and S3 for every test: from the environment, from Docker, or embedded.

A session fixture migrates a template database once; each test gets its own copy of it
(CREATE DATABASE ... TEMPLATE) and its own key prefix in the shared test bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.core import repository
from service.core.blobstore import BlobStore, open_blob_store
from service.core.lifecycle import Shutdown
from service.core.migrate import migrate
from service.core.settings import Settings
from service.dev.embedded import EmbeddedPostgres, EmbeddedS3
from tests.support import (
    EMPTY,
    OPEN_DEVELOPMENT,
    Browser,
    Client,
    Engines,
    MakeClient,
    StartWorker,
    database_url,
    find_browser,
    remove_engine_data,
    table_counts,
)
from workers.outbox import run_worker

TEMPLATE_DB = "profiles_template"
TEST_BUCKET = "profiles-test"


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    """A private folder for the session's engines, removed at the end with their clusters."""
    path = Path(tempfile.mkdtemp(prefix="profiles-tests-"))
    yield path
    remove_engine_data(path)


def _docker_answers() -> bool:
    try:
        from testcontainers.core.docker_client import DockerClient

        DockerClient().client.ping()
    except Exception:
        return False
    return True


def _from_docker(stack: contextlib.ExitStack) -> Engines:
    from testcontainers.minio import MinioContainer
    from testcontainers.postgres import PostgresContainer

    postgres = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
    minio = stack.enter_context(MinioContainer())
    config = minio.get_config()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = config["access_key"], config["secret_key"]
    return Engines(postgres.get_connection_url(), f"http://{config['endpoint']}", "testcontainers")


def _embedded(stack: contextlib.ExitStack, scratch: Path) -> Engines:
    postgres = EmbeddedPostgres(scratch / "postgres")
    postgres.start()
    stack.callback(postgres.stop)
    s3 = EmbeddedS3(scratch / "s3")
    s3.start()
    stack.callback(s3.kill)
    return Engines(postgres.url(), s3.endpoint_url, "embedded")


@pytest.fixture(scope="session")
def engines(scratch_dir: Path) -> Iterator[Engines]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    with contextlib.ExitStack() as stack:
        db, s3 = os.environ.get("PROFILES_TEST_DATABASE_URL"), os.environ.get("PROFILES_TEST_S3_ENDPOINT_URL")
        if db and s3:
            found = Engines(db, s3, "environment")
        elif _docker_answers():
            found = _from_docker(stack)
        else:
            found = _embedded(stack, scratch_dir)
        asyncio.run(_prepare(found))
        yield found


async def _prepare(engines: Engines) -> None:
    conn = await asyncpg.connect(engines.admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await conn.close()
    migrate(database_url(engines.admin_url, TEMPLATE_DB))
    settings = Settings(database_url=engines.admin_url, s3_endpoint_url=engines.s3_endpoint_url, s3_bucket=TEST_BUCKET)
    async with open_blob_store(settings) as blobs:
        await blobs.ensure_bucket()
        # The first write to a new bucket makes the store allocate volumes, which takes seconds.
        await blobs.put_once("warm-up", b"warm", hashlib.sha256(b"warm").hexdigest(), "text/plain")


def settings_for(engines: Engines, database: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url(engines.admin_url, database),
        "s3_endpoint_url": engines.s3_endpoint_url,
        "s3_bucket": TEST_BUCKET,
        "s3_key_prefix": f"{database}/",
        "lease_seconds": 10.0,
        "attempt_timeout_seconds": 5.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.5,
        "poll_interval_seconds": 0.2,
        "worker_concurrency": 4,
        # The production default: a burst of first requests opens the pool's connections while the
        # other test process loads both cores (2 s once timed seven of eight concurrent writers out).
        "db_acquire_timeout_seconds": 5.0,
        **OPEN_DEVELOPMENT,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def database(engines: Engines) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(engines.admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        yield name
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
def settings(engines: Engines, database: str) -> Settings:
    return settings_for(engines, database)


@pytest.fixture
async def blobs(settings: Settings) -> AsyncIterator[BlobStore]:
    async with open_blob_store(settings) as store:
        yield store


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[repository.Pool]:
    """A connection pool of the test's database, for tests that call the repository directly."""
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=6, timeout=5)
    yield pool
    await pool.close()


@pytest.fixture
async def make_client(database: str) -> AsyncIterator[MakeClient]:
    """Clients of in-process API instances, closed before the test database is dropped."""
    clients: list[Client] = []

    async def make(settings: Settings) -> Client:
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient, settings: Settings) -> Client:
    return await make_client(settings)


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[StartWorker]:
    """Runs in-process workers (the same code `profiles worker` runs) until the test ends."""
    running: list[tuple[Shutdown, asyncio.Task[None]]] = []

    async def start(custom: Settings | None = None) -> None:
        shutdown = Shutdown()
        running.append((shutdown, asyncio.create_task(run_worker(custom or settings, shutdown))))

    yield start
    for shutdown, _ in running:
        shutdown.request()
    await asyncio.gather(*(task for _, task in running))


@pytest.fixture
def db_url(settings: Settings) -> str:
    return settings.database_url


@pytest.fixture
async def nothing_stored(settings: Settings, blobs: BlobStore) -> AsyncIterator[None]:
    """After the test, the database and the bucket must be exactly as before it."""
    assert await table_counts(settings.database_url) == EMPTY
    yield
    assert await table_counts(settings.database_url) == EMPTY
    assert await blobs.list_keys(settings.s3_key_prefix) == []


@pytest.fixture(scope="session")
def browser_driver(scratch_dir: Path) -> Iterator[Any]:
    """One headless Chromium for the session (starting one takes seconds); quit at the end, so neither
    it nor chromedriver outlives the tests."""
    found = find_browser()
    if found is None:
        message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the browser tests")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    # --no-sandbox: Chromium's sandbox refuses to start as root, which is how CI runs.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={scratch_dir / 'chromium'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def browser(browser_driver: Any) -> AsyncIterator[Browser]:
    """The session's browser with a clean slate: no cookies from an earlier test."""
    driver = Browser(browser_driver)
    yield driver
    await driver.call(browser_driver.delete_all_cookies)

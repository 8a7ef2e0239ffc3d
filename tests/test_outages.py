"""Outages of each store, with dedicated server processes that the tests stop and start again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError

from service.core.blobstore import BlobStore, open_blob_store
from service.core.migrate import MIGRATIONS_DIR, migrate
from service.core.settings import Settings
from service.dev.embedded import EmbeddedPostgres, EmbeddedS3
from tests.support import (
    MakeClient,
    StartWorker,
    accepted,
    eventually,
    finished_intent,
    live_pair,
    png,
    put_profile,
    wait_live,
)


@pytest.fixture
def own_s3(scratch_dir: Path) -> Iterator[EmbeddedS3]:
    s3 = EmbeddedS3(scratch_dir / f"s3-{uuid.uuid4().hex[:8]}")
    s3.start()
    yield s3
    s3.kill()


@pytest.fixture
def own_postgres(scratch_dir: Path) -> Iterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(scratch_dir / f"pg-{uuid.uuid4().hex[:8]}")
    postgres.start()
    migrate(postgres.url())
    yield postgres
    postgres.stop()


async def test_writes_keep_being_accepted_while_s3_is_down_and_publish_when_it_returns(
    make_client: MakeClient,
    start_worker: StartWorker,
    settings: Settings,
    own_s3: EmbeddedS3,
) -> None:
    on_own_s3 = settings.model_copy(
        update={"s3_endpoint_url": own_s3.endpoint_url, "max_attempts": 100, "retry_max_seconds": 1.0}
    )
    async with open_blob_store(on_own_s3) as blobs:
        await blobs.ensure_bucket()
    client = await make_client(on_own_s3)
    await start_worker(on_own_s3)
    await accepted(client, "sam", {"display_name": "before"}, png(1))
    await wait_live(client, "sam", 1)

    own_s3.kill()
    during = [await accepted(client, "sam", {"display_name": f"during-{i}"}, png(10 + i)) for i in range(3)]
    metadata_only = await (await client.get("/v1/profiles/sam")).json()
    assert (metadata_only["version"], metadata_only["metadata"]["display_name"]) == (1, "before")
    embedded = await client.get("/v1/profiles/sam?embed=image")
    assert embedded.status == 503 and embedded.headers["Retry-After"]
    assert (await client.get("/readyz")).status == 503

    own_s3.start()
    newest = max(body["version"] for body in during)
    await wait_live(client, "sam", newest)
    assert await live_pair(client, "sam") == (newest, "during-2", png(12))
    for body in during:
        finished = await finished_intent(on_own_s3.database_url, body["intent_id"])
        assert finished["state"] in {"done", "superseded"}, finished["last_error"]


async def test_postgres_down_answers_503_fast_uploads_nothing_and_everything_recovers(
    make_client: MakeClient,
    start_worker: StartWorker,
    own_postgres: EmbeddedPostgres,
    settings: Settings,
) -> None:
    on_own_pg = settings.model_copy(update={"database_url": own_postgres.url()})
    client = await make_client(on_own_pg)
    await start_worker(on_own_pg)
    await accepted(client, "tom", {"display_name": "before"}, png(20))
    await wait_live(client, "tom", 1)
    async with open_blob_store(on_own_pg) as blobs:
        keys_before = await blobs.list_keys(on_own_pg.s3_key_prefix)
    assert len(keys_before) == 1 + len(on_own_pg.variants)

    own_postgres.stop()
    write = await put_profile(client, "tom", {"display_name": "during"}, png(21))
    assert write.status == 503 and write.headers["Retry-After"]
    assert write.content_type == "application/problem+json"
    for path in ("/v1/profiles/tom", "/v1/profiles/tom/image", "/readyz"):
        response = await client.get(path)
        assert response.status == 503, path
    async with open_blob_store(on_own_pg) as blobs:
        assert await blobs.list_keys(on_own_pg.s3_key_prefix) == keys_before

    own_postgres.start()

    # Polled: the API's pool reconnects on its own, and nothing announces it.
    async def write_accepted() -> int | None:
        response = await put_profile(client, "tom", {"display_name": "after"}, png(22))
        return (await response.json())["version"] if response.status == 202 else None

    version = await eventually(write_accepted, what="writes to be accepted again")
    assert version == 2
    await wait_live(client, "tom", 2)
    assert await live_pair(client, "tom") == (2, "after", png(22))
    conn = await asyncpg.connect(own_postgres.url())
    try:
        assert await conn.fetchval("SELECT count(*) FROM intents WHERE state <> 'done'") == 0
    finally:
        await conn.close()


async def test_many_migrations_at_once_apply_the_schema_once(scratch_dir: Path) -> None:
    postgres = EmbeddedPostgres(scratch_dir / f"pg-migrate-{uuid.uuid4().hex[:8]}")
    postgres.start()
    try:
        results = await asyncio.gather(*(asyncio.to_thread(migrate, postgres.url()) for _ in range(4)))
        assert sum("Applied" in result for result in results) == 1
        conn = await asyncpg.connect(postgres.url())
        try:
            versions = await conn.fetch("SELECT version FROM schema_migrations")
            assert len(versions) == len(list(MIGRATIONS_DIR.glob("*.sql")))
            assert await conn.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_name = 'intents'")
        finally:
            await conn.close()
    finally:
        postgres.stop()


class _StartingStore:
    """A store still starting up: its bucket is missing, and its first CreateBucket answers what is
    not S3 (SeaweedFS's filer has answered `{"name": ...}` there)."""

    def __init__(self) -> None:
        self.created = False
        self.creates = 0

    async def head_bucket(self, **_: object) -> None:
        if not self.created:
            raise ClientError({"Error": {"Code": "404"}}, "HeadBucket")

    async def create_bucket(self, **_: object) -> None:
        self.creates += 1
        if self.creates == 1:
            raise ResponseParserError('invalid XML received: b\'{"name":"profiles"}\'')
        self.created = True


async def test_a_store_whose_first_create_bucket_answers_garbage_gets_its_bucket_on_a_later_try() -> None:
    store = _StartingStore()
    await BlobStore(store, "profiles").ensure_bucket(wait_seconds=5)
    assert store.created and store.creates == 2

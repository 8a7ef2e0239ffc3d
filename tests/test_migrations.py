"""Migrations roll back to a schema the release before can run, and apply again."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator

import asyncpg

from service.core import repository
from service.core.migrate import MIGRATIONS_DIR, dbmate_binary, dbmate_url
from service.core.settings import Settings
from service.core.variants import VariantSpec
from tests.support import Client, MakeClient, StartWorker, accepted, png, publish_due, version_keys, wait_live
from workers.variant_walk import VariantWalk

STRUCTURE = "20261201010000"
TRACES = "20261201020000"
CONSOLE = "20261201030000"
VARIANTS = "20261201040000"
VARIANT_WALK = "20261202000000"
FIRST_PUBLISH = "20261203000000"


def _dbmate(url: str, command: str) -> None:
    subprocess.run(
        [
            dbmate_binary(),
            "--url",
            dbmate_url(url),
            "--migrations-dir",
            str(MIGRATIONS_DIR),
            "--no-dump-schema",
            command,
        ],
        check=True,
        capture_output=True,
    )


async def _applied(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    finally:
        await conn.close()


async def _roll_back_through(url: str, version: str) -> None:
    """Roll back, newest first, until migration `version` is undone too."""
    while version in await _applied(url):
        _dbmate(url, "rollback")


async def test_a_rollback_of_the_structure_migration_leaves_records_the_release_before_can_answer(
    client: Client, settings: Settings
) -> None:
    """The release before answers a replayed key with the stored body, `status_url` included."""
    await accepted(client, "rob", {"display_name": "Rob"}, png(905), {"Idempotency-Key": "k1"})
    await _roll_back_through(settings.database_url, STRUCTURE)
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = json.loads(await conn.fetchval("SELECT response_body FROM idempotency_keys"))
    finally:
        await conn.close()
    assert {"user_id", "version", "intent_id", "state", "status_url"} <= set(stored), stored


async def test_the_structure_migration_rolls_back_and_applies_again(settings: Settings) -> None:
    await _roll_back_through(settings.database_url, STRUCTURE)
    _dbmate(settings.database_url, "migrate")
    conn = await asyncpg.connect(settings.database_url)
    try:
        triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'retire_%'")
    finally:
        await conn.close()
    assert triggers == 2


async def test_the_traces_migration_rolls_back_to_intents_without_span_contexts_and_applies_again(
    settings: Settings,
) -> None:
    columns = (
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'intents' AND column_name LIKE '%traceparent'"
    )
    await _roll_back_through(settings.database_url, TRACES)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval(columns) == 0
        _dbmate(settings.database_url, "migrate")
        assert await conn.fetchval(columns) == 2
    finally:
        await conn.close()


async def test_the_console_migration_rolls_back_and_applies_again(settings: Settings) -> None:
    async def console_columns() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            found: int = await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name IN ('replay_jobs', 'replay_job_intents')"
                " OR (table_name = 'maintenance_runs' AND column_name IN ('last_finished_at', 'last_report'))"
            )
        finally:
            await conn.close()
        return found

    applied = await console_columns()
    await _roll_back_through(settings.database_url, CONSOLE)
    assert await console_columns() == 0
    _dbmate(settings.database_url, "migrate")
    assert await console_columns() == applied > 0


async def test_the_variants_migration_rolls_back_to_the_release_before_and_applies_again(
    client: Client, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    await accepted(client, "vic", {"display_name": "Vic"}, png(906))
    await wait_live(client, "vic", 1)
    before = await (await client.get("/v1/profiles/vic")).json()
    assert set(before["variants"]) == {spec.name for spec in settings.variants}
    await _roll_back_through(settings.database_url, VARIANTS)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('version_variants') IS NULL")
        assert await conn.fetchval("SELECT blob_is_needed(blob_key) FROM versions WHERE user_id = 'vic'")
    finally:
        await conn.close()
    _dbmate(settings.database_url, "migrate")
    # The rollback forgot the variants (their blobs are strays for reconciliation); the image stays.
    body = await (await client.get("/v1/profiles/vic")).json()
    assert body["version"] == 1 and body["variants"] == {}
    assert await (await client.get("/v1/profiles/vic/image")).read() == png(906)


async def test_the_variant_walk_migration_rolls_back_without_its_intents_and_applies_again_to_finish_the_walk(
    make_client: MakeClient, settings: Settings
) -> None:
    before = settings.model_copy(update={"variants": (VariantSpec("thumb", 64), VariantSpec("small", 32))})
    await accepted(await make_client(before), "wes", {"display_name": "Wes"}, png(907))
    await publish_due(before)
    after = settings.model_copy(update={"variants": (VariantSpec("thumb", 64), VariantSpec("medium", 48))})
    async with _pool(settings) as pool:
        keys = await _pairs(pool, "SELECT name, blob_key FROM version_variants")
        assert await VariantWalk(after, pool).round() == 1  # small removed, medium queued
        keys |= await _pairs(pool, "SELECT name, blob_key FROM version_variants")
    await _roll_back_through(settings.database_url, VARIANT_WALK)
    async with _pool(settings) as pool:
        assert await pool.fetchval("SELECT to_regclass('variant_walks') IS NULL")
        assert await pool.fetchval("SELECT count(*) FROM intents") == 1  # only the publish intent
        assert await pool.fetchval("SELECT 1 FROM pg_constraint WHERE conname = 'intents_user_id_version_key'")
        reasons = await _pairs(pool, "SELECT blob_key, reason FROM blob_deletions")
        # What the add_variants intent was making goes with it: its key is scheduled.
        assert reasons == {keys["small"]: "replaced", keys["medium"]: "failed"}
        assert {row["name"] for row in await pool.fetch("SELECT name FROM version_variants")} == {"thumb"}
    _dbmate(settings.database_url, "migrate")
    async with _pool(settings) as pool:
        assert await VariantWalk(after, pool).round() == 1
    assert await publish_due(after) == 1
    medium = await (await make_client(after)).get("/v1/profiles/wes/image?variant=medium")
    assert medium.status == 200


async def test_the_first_publish_trigger_migration_rolls_back_and_applies_again_retiring_only_replaced_blobs(
    client: Client, settings: Settings
) -> None:
    trigger = "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'retire_replaced_blob'"
    url = settings.database_url

    async def publish(user: str, name: str, seed: int) -> None:
        await accepted(client, user, {"display_name": name}, png(seed))
        assert await publish_due(settings) == 1

    await publish("fae", "one", 908)
    await _roll_back_through(url, FIRST_PUBLISH)
    async with _pool(settings) as pool:
        assert "IS NOT NULL" not in await pool.fetchval(trigger)
    # Under either trigger a first publish retires nothing and a replacement retires what it replaced.
    await publish("gil", "one", 909)
    await publish("fae", "two", 910)
    _dbmate(url, "migrate")
    async with _pool(settings) as pool:
        assert "old.live_version IS NOT NULL" in await pool.fetchval(trigger)
    await publish("hal", "one", 911)
    await publish("fae", "three", 912)
    replaced = await version_keys(url, "fae", 1) | await version_keys(url, "fae", 2)
    async with _pool(settings) as pool:
        assert await _pairs(pool, "SELECT blob_key, reason FROM blob_deletions") == dict.fromkeys(replaced, "replaced")
    assert len(replaced) == 2 * (1 + len(settings.variants))


@contextlib.asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[repository.Pool]:
    """A pool of its own: one opened before a migration would keep plans of the schema before."""
    pool = await repository.create_pool(settings.database_url, min_size=1, max_size=4, timeout=5)
    try:
        yield pool
    finally:
        await pool.close()


async def _pairs(pool: repository.Pool, statement: str) -> dict[str, str]:
    return {row[0]: row[1] for row in await pool.fetch(statement)}

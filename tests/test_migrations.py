"""Migrations roll back to a schema the release before can run, and apply again."""

from __future__ import annotations

import json
import subprocess

import asyncpg

from service.core.migrate import MIGRATIONS_DIR, dbmate_binary, dbmate_url
from service.core.settings import Settings
from tests.support import Client, StartWorker, accepted, png, wait_live

STRUCTURE = "20261201010000"
VARIANTS = "20261201040000"


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


async def _rollback_through(url: str, version: str) -> None:
    """Roll back, one migration at a time, until `version` is no longer applied."""
    conn = await asyncpg.connect(url)
    try:
        while await conn.fetchval("SELECT max(version) >= $1 FROM schema_migrations", version):
            _dbmate(url, "rollback")
    finally:
        await conn.close()


async def test_a_rollback_of_the_structure_migration_leaves_records_the_release_before_can_answer(
    client: Client, settings: Settings
) -> None:
    """The release before answers a replayed key with the stored body, `status_url` included."""
    await accepted(client, "rob", {"display_name": "Rob"}, png(905), {"Idempotency-Key": "k1"})
    await _rollback_through(settings.database_url, STRUCTURE)
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = json.loads(await conn.fetchval("SELECT response_body FROM idempotency_keys"))
    finally:
        await conn.close()
    assert {"user_id", "version", "intent_id", "state", "status_url"} <= set(stored), stored


async def test_the_structure_migration_rolls_back_and_applies_again(settings: Settings) -> None:
    await _rollback_through(settings.database_url, STRUCTURE)
    _dbmate(settings.database_url, "migrate")
    conn = await asyncpg.connect(settings.database_url)
    try:
        triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'retire_%'")
    finally:
        await conn.close()
    assert triggers == 2


async def test_the_variants_migration_rolls_back_to_the_release_before_and_applies_again(
    client: Client, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    await accepted(client, "vic", {"display_name": "Vic"}, png(906))
    await wait_live(client, "vic", 1)
    before = await (await client.get("/v1/profiles/vic")).json()
    assert set(before["variants"]) == {spec.name for spec in settings.variants}
    await _rollback_through(settings.database_url, VARIANTS)
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

"""Migrations roll back to a schema the release before can run, and apply again."""

from __future__ import annotations

import json
import subprocess

import asyncpg

from service.core.migrate import MIGRATIONS_DIR, dbmate_binary, dbmate_url
from service.core.settings import Settings
from tests.support import Client, accepted, png


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


async def test_a_rollback_of_the_structure_migration_leaves_records_the_release_before_can_answer(
    client: Client, settings: Settings
) -> None:
    """The release before answers a replayed key with the stored body, `status_url` included."""
    await accepted(client, "rob", {"display_name": "Rob"}, png(905), {"Idempotency-Key": "k1"})
    _dbmate(settings.database_url, "rollback")
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = json.loads(await conn.fetchval("SELECT response_body FROM idempotency_keys"))
    finally:
        await conn.close()
    assert {"user_id", "version", "intent_id", "state", "status_url"} <= set(stored), stored


async def test_the_structure_migration_rolls_back_and_applies_again(settings: Settings) -> None:
    _dbmate(settings.database_url, "rollback")
    _dbmate(settings.database_url, "migrate")
    conn = await asyncpg.connect(settings.database_url)
    try:
        triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'retire_%'")
    finally:
        await conn.close()
    assert triggers == 2

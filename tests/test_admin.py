"""Operator surfaces: /v1/admin/intents, `profiles intents` and `profiles gc`, metrics and logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from service.core import repository
from service.core.logs import REQUEST_ID, configure_logging
from service.core.repository import Pool
from service.core.settings import Settings
from service.dev.embedded import free_port
from tests.support import (
    ADMIN_SCOPE,
    JWT_SECRET,
    ROOT,
    Client,
    MakeClient,
    WorkerProcess,
    accepted,
    bearer,
    eventually,
    kill_pending,
    png,
    publish_due,
    settings_env,
)

# Made at import and used until the session ends: it must outlive the whole run, not the default minutes.
AUTH = bearer("operator", scope=ADMIN_SCOPE, lifetime=6 * 3600)


@pytest.fixture
async def admin(make_client: MakeClient, settings: Settings) -> Client:
    return await make_client(settings.model_copy(update={"auth_jwt_secret": SecretStr(JWT_SECRET), "max_attempts": 1}))


async def test_admin_routes_require_a_token_with_the_admin_scope(admin: Client) -> None:
    refused = {
        401: ({}, bearer("operator", scope=ADMIN_SCOPE, secret="another-secret-of-at-least-32-bytes!")),
        403: (bearer("operator"), bearer("operator", scope="profiles:read")),
    }
    for status, attempts in refused.items():
        for headers in attempts:
            response = await admin.get("/v1/admin/intents", headers=headers)
            assert response.status == status
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.content_type == "application/problem+json"
    assert (await admin.get("/v1/admin/intents", headers=AUTH)).status == 200


async def test_admin_refuses_bad_limits_ages_and_odd_tokens_without_errors(admin: Client) -> None:
    for query in (
        {"limit": "0"},
        {"limit": "-2"},
        {"limit": "x"},
        {"older_than_seconds": "inf"},
        {"older_than_seconds": "nan"},
        {"older_than_seconds": "1e300"},
        {"cursor": "garbage"},
        {"user_id": "nul\x00byte"},  # found by the fuzzer: PostgreSQL text cannot hold NUL
    ):
        response = await admin.get("/v1/admin/intents", params=query, headers=AUTH)
        assert response.status == 400, query
    odd = await admin.get("/v1/admin/intents", headers={"Authorization": "Bearer caf\u00e9-token-123456"})
    assert odd.status == 401
    for body in ({"state": "dead", "older_than_seconds": 1e300}, {"state": "dead", "user_id": "nul\x00byte"}):
        assert (await admin.post("/v1/admin/intents/replay", json=body, headers=AUTH)).status == 422, body


async def test_admin_lists_with_filters_and_cursor_pages_through_every_intent(admin: Client, pool: Pool) -> None:
    made = [await accepted(admin, f"user-{i % 2}", {"display_name": str(i)}, png(i), AUTH) for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await (await admin.get("/v1/admin/intents", params=query, headers=AUTH)).json()
        seen += [item["intent_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [body["intent_id"] for body in made]
    mine = await (await admin.get("/v1/admin/intents", params={"user_id": "user-1"}, headers=AUTH)).json()
    assert [item["version"] for item in mine["items"]] == [1, 2]
    assert (await admin.get("/v1/admin/intents", params={"state": "nope"}, headers=AUTH)).status == 400
    one = await (await admin.get(f"/v1/admin/intents/{made[0]['intent_id']}", headers=AUTH)).json()
    assert one["state"] == "pending" and one["replays"] == 0 and one["leased"] is False


async def test_admin_replays_one_and_many_and_refuses_a_leased_intent(admin: Client, pool: Pool) -> None:
    first = await accepted(admin, "ann", {"display_name": "A"}, png(1), AUTH)
    second = await accepted(admin, "bob", {"display_name": "B"}, png(2), AUTH)
    third = await accepted(admin, "cat", {"display_name": "C"}, png(3), AUTH)
    await kill_pending(pool)
    url = f"/v1/admin/intents/{first['intent_id']}/replay"
    assert (await (await admin.post(url, headers=AUTH)).json())["outcome"] == "replayed"
    assert (await (await admin.post(url, headers=AUTH)).json())["outcome"] == "already_pending"

    dry = await admin.post("/v1/admin/intents/replay", json={"state": "dead", "dry_run": True}, headers=AUTH)
    assert (await dry.json())["outcomes"] == {"would_replay": 2}
    many = await (await admin.post("/v1/admin/intents/replay", json={"state": "dead"}, headers=AUTH)).json()
    assert many["outcomes"] == {"replayed": 2}
    assert {item["intent_id"] for item in many["intents"]} == {second["intent_id"], third["intent_id"]}
    assert (await admin.post("/v1/admin/intents/replay", json={"state": "done"}, headers=AUTH)).status == 422

    await repository.claim_intents(pool, 10, "test", 30)
    leased = await admin.post(url, headers=AUTH)
    assert leased.status == 409 and (await leased.json())["errors"][0]["message"] == "leased"
    assert (await admin.post(f"/v1/admin/intents/{'0' * 32}/replay", headers=AUTH)).status == 404


def profiles(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=settings_env(settings),
        timeout=120,
        check=False,
    )


async def test_the_intents_commands_list_show_and_replay_dead_intents(
    client: Client, settings: Settings, pool: Pool
) -> None:
    bodies = [await accepted(client, "dee", {"display_name": str(i)}, png(i)) for i in range(3)]
    await kill_pending(pool)
    listed = json.loads(profiles(settings, "intents", "list", "--state", "dead", "--json").stdout)
    assert [item["intent_id"] for item in listed] == [body["intent_id"] for body in bodies]
    table = profiles(settings, "intents", "list", "--state", "dead", "--user", "dee")
    assert "3 intent(s)" in table.stdout and "S3 outage" in table.stdout
    shown = json.loads(profiles(settings, "intents", "show", bodies[0]["intent_id"], "--json").stdout)
    assert shown["last_error"] == "S3 outage"

    dry = json.loads(profiles(settings, "intents", "replay", "--all-dead", "--dry-run", "--json").stdout)
    assert dry["outcomes"] == {"would_replay": 3}
    replayed = profiles(settings, "intents", "replay", "--all-dead", "--user", "dee")
    assert replayed.returncode == 0 and "3 replayed" in replayed.stdout
    again = profiles(settings, "intents", "replay", bodies[0]["intent_id"], "--json")
    assert json.loads(again.stdout)["outcomes"] == {"already_pending": 1}
    assert await publish_due(settings) == 3
    assert profiles(settings, "intents", "replay", bodies[0]["intent_id"]).returncode == 1
    bad = profiles(settings, "intents", "list", "--older-than", "soon")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0


async def test_the_gc_command_reports_reconciliation_collection_and_backlog(client: Client, settings: Settings) -> None:
    await accepted(client, "eve", {"display_name": "v1"}, png(1))
    await accepted(client, "eve", {"display_name": "v2"}, png(2))
    assert await publish_due(settings) == 2
    blobs = 1 + len(settings.variants)  # a version's image and its variants
    report = json.loads(profiles(settings, "gc", "--reconcile", "--json").stdout)
    assert report["reconcile"]["listed"] == 2 * blobs and report["reconcile"]["needed"] == blobs
    assert report["collect"] == {"deleted": 0, "failed": 0}
    assert report["backlog"] == {"scheduled": blobs, "due": 0}
    dry = json.loads(profiles(settings, "gc", "--reconcile", "--dry-run", "--json").stdout)
    assert dry["reconcile"]["dry_run"] is True and "collect" not in dry


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def metric(text: str, name: str, **labels: str) -> float:
    value = sample(text, name, **labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


async def test_the_api_serves_request_and_queue_metrics(client: Client) -> None:
    await accepted(client, "fay", {"display_name": "F"}, png(1))
    await client.get("/v1/profiles/fay")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "profiles_http_requests_total", route="/v1/profiles/{user_id}", status="202") >= 1
    assert metric(text, "profiles_http_requests_total", route="/v1/profiles/{user_id}", status="404") >= 1
    assert metric(text, "profiles_intents", state="pending") == 1
    assert metric(text, "profiles_queue_lag_seconds") >= 0
    assert metric(text, "profiles_gc_backlog", due="true") == 0


async def test_a_worker_serves_its_metrics_and_logs_json_lines_naming_the_intent(
    client: Client, settings: Settings
) -> None:
    port = free_port()
    worker = await WorkerProcess(settings.model_copy(update={"worker_metrics_port": port})).start()
    try:
        body = await accepted(client, "gus", {"display_name": "G"}, png(1))
        async with aiohttp.ClientSession() as session:
            # Polled: the worker counts an intent just after the statement that finished it commits.
            async def counted() -> str | None:
                text = await (await session.get(f"http://127.0.0.1:{port}/metrics")).text()
                return text if sample(text, "profiles_intents_finished_total", state="done") == 1 else None

            text = await eventually(counted, what="the worker to count the intent done")
        variants = json.loads(await (await client.get("/v1/profiles/gus")).text())["variants"]
        uploaded = len(png(1)) + sum(variant["size"] for variant in variants.values())
        assert metric(text, "profiles_upload_bytes_total") == uploaded
        assert metric(text, "profiles_intent_enqueue_to_claim_seconds_count") == 1
    finally:
        assert await worker.stop() == 0
    lines = [json.loads(line) for line in worker.lines if line.startswith("{")]
    about = [line for line in lines if line.get("intent_id") == body["intent_id"]]
    assert about and about[-1]["user_id"] == "gus" and about[-1]["version"] == 1 and about[-1]["level"] == "INFO"


async def test_requests_carry_an_id_that_is_echoed_and_logged(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert given.headers["X-Request-ID"] == "trace-42"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(made.headers["X-Request-ID"]) == 32

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json")
        token = REQUEST_ID.set("trace-43")
        logging.getLogger("test").info("hello", extra={"user_id": "u1"})
        REQUEST_ID.reset(token)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    line: dict[str, Any] = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["request_id"] == "trace-43" and line["user_id"] == "u1" and line["message"] == "hello"


def test_a_grace_period_not_longer_than_the_deadlines_is_refused() -> None:
    with pytest.raises(ValueError, match="PROFILES_GC_GRACE_SECONDS"):
        Settings(database_url="postgresql://x/y", gc_grace_seconds=20, request_timeout_seconds=30)
    with pytest.raises(ValueError, match="PROFILES_GC_GRACE_SECONDS"):
        Settings(database_url="postgresql://x/y", gc_grace_seconds=40, lease_seconds=100)
    Settings(database_url="postgresql://x/y", gc_grace_seconds=31)


async def test_an_unknown_query_parameter_of_an_admin_route_is_refused_rather_than_ignored(client: Client) -> None:
    for url in ("/v1/admin/intents?stat=dead", f"/v1/admin/intents/{uuid.uuid4()}/replay?dryrun=1"):
        response = await (client.get(url) if "replay" not in url else client.post(url))
        assert response.status == 400, url
        assert "unknown query parameter" in (await response.json())["detail"]

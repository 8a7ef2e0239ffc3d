"""Idempotency keys, preconditions, Prefer: wait, conditional reads, intents and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.api.state import POOL
from service.core import repository
from service.core.settings import Settings
from tests.support import (
    Client,
    MakeClient,
    StartWorker,
    accepted,
    assert_problem,
    png,
    publish_due,
    put_profile,
    table_counts,
    wait_live,
)


async def test_a_retry_with_the_same_idempotency_key_returns_the_first_response_and_creates_nothing(
    client: Client,
    settings: Settings,
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    first = await accepted(client, "ida", {"display_name": "Ida"}, png(1), headers)
    counts = await table_counts(settings.database_url)
    again = await accepted(client, "ida", {"display_name": "Ida"}, png(1), headers)
    assert again == first
    assert await table_counts(settings.database_url) == counts
    other_user = await accepted(client, "ivy", {"display_name": "Ida"}, png(1), headers)
    assert other_user["intent_id"] != first["intent_id"]


async def test_a_retry_while_the_first_request_is_in_flight_is_409(client: Client, settings: Settings) -> None:
    conn = await repository.connect(settings.database_url, timeout=5)
    try:
        async with conn.transaction():
            assert await repository.try_lock_idempotency_key(conn, "jo", "busy-key")
            response = await put_profile(client, "jo", {"display_name": "Jo"}, png(2), {"Idempotency-Key": "busy-key"})
            assert response.status == 409
            assert response.content_type == "application/problem+json"
    finally:
        await conn.close()
    assert (
        await put_profile(client, "jo", {"display_name": "Jo"}, png(2), {"Idempotency-Key": "busy-key"})
    ).status == 202


async def test_if_none_match_star_creates_only_and_if_match_requires_the_newest_version(
    client: Client, settings: Settings
) -> None:
    create_only = {"If-None-Match": "*"}
    assert (await put_profile(client, "kim", {"display_name": "K"}, png(3), create_only)).status == 202
    assert await publish_due(settings) == 1
    assert (await put_profile(client, "kim", {"display_name": "K"}, png(4), create_only)).status == 412
    assert (await put_profile(client, "kim", {"display_name": "K"}, png(5), {"If-Match": '"2"'})).status == 412
    body = await accepted(client, "kim", {"display_name": "K"}, png(6), {"If-Match": '"1"'})
    assert body["version"] == 2
    assert (await client.delete("/v1/profiles/kim", headers={"If-Match": '"1"'})).status == 412
    assert (await client.delete("/v1/profiles/kim", headers={"If-Match": '"2"'})).status == 204
    assert (await put_profile(client, "kim", {"display_name": "K"}, png(7), create_only)).status == 202
    assert (await put_profile(client, "new", {"display_name": "N"}, png(8), {"If-Match": '"1"'})).status == 412


@pytest.mark.usefixtures("nothing_stored")
async def test_a_refused_precondition_on_a_new_user_stores_nothing_not_even_the_profile_row(client: Client) -> None:
    # The write is recorded before its precondition is checked (one statement): the refusal must
    # roll all of it back.
    for headers in ({"If-Match": '"1"'}, {"If-Match": '"0"'}):
        refused = await put_profile(client, "nobody", {"display_name": "N"}, png(14), headers)
        assert refused.status == 412
        assert refused.content_type == "application/problem+json"


async def test_a_refused_write_names_the_newest_accepted_version_and_leaves_no_gap(
    client: Client, settings: Settings
) -> None:
    await accepted(client, "rex", {"display_name": "one"}, png(15))
    assert await publish_due(settings) == 1
    await accepted(client, "rex", {"display_name": "two"}, png(16))
    counts = await table_counts(settings.database_url)
    stale = await assert_problem(
        await put_profile(client, "rex", {"display_name": "K"}, png(17), {"If-Match": '"1"'}), 412
    )
    assert stale["detail"] == "If-Match is 1, but the newest version is 2"
    exists = await assert_problem(
        await put_profile(client, "rex", {"display_name": "K"}, png(18), {"If-None-Match": "*"}), 412
    )
    assert exists["detail"] == "the profile exists, but If-None-Match: * was given"
    assert await table_counts(settings.database_url) == counts
    assert (await accepted(client, "rex", {"display_name": "three"}, png(19), {"If-Match": '"2"'}))["version"] == 3


async def test_create_only_writes_racing_a_live_profile_are_all_refused(client: Client, settings: Settings) -> None:
    await accepted(client, "uno", {"display_name": "first"}, png(9))
    assert await publish_due(settings) == 1
    responses = await asyncio.gather(
        *(put_profile(client, "uno", {"display_name": str(i)}, png(i), {"If-None-Match": "*"}) for i in range(6))
    )
    assert [response.status for response in responses] == [412] * 6


async def pending_put_after_delete(client: Client, settings: Settings, user: str) -> int:
    """A live profile, deleted, then written again: the new version is accepted but not yet live."""
    await accepted(client, user, {"display_name": "before"}, png(10))
    assert await publish_due(settings) == 1
    assert (await client.delete(f"/v1/profiles/{user}")).status == 204
    body = await accepted(client, user, {"display_name": "after"}, png(11))
    version: int = body["version"]
    return version


async def test_after_delete_and_a_pending_put_every_route_agrees_the_profile_does_not_exist(
    client: Client, settings: Settings
) -> None:
    pending = await pending_put_after_delete(client, settings, "zed")
    assert (await client.get("/v1/profiles/zed")).status == 404
    assert (await client.get("/v1/profiles/zed/image")).status == 404
    assert (await client.delete("/v1/profiles/zed")).status == 404
    refused = await put_profile(client, "zed", {"display_name": "K"}, png(12), {"If-Match": f'"{pending}"'})
    assert refused.status == 412
    created = await accepted(client, "zed", {"display_name": "created"}, png(13), {"If-None-Match": "*"})
    assert created["version"] == pending + 1
    assert await publish_due(settings) == 2
    assert (await client.get("/v1/profiles/zed")).status == 200
    assert (await client.delete("/v1/profiles/zed")).status == 204


async def test_after_delete_and_a_put_that_died_the_profile_can_be_created_again(
    client: Client, settings: Settings
) -> None:
    await pending_put_after_delete(client, settings, "ida")
    async with client.app[POOL].acquire() as conn:
        await conn.execute("UPDATE intents SET max_attempts = 1, attempts = 1, state = 'dead'")
        await conn.execute("UPDATE versions SET state = 'failed' WHERE state = 'pending'")
    assert (await client.get("/v1/profiles/ida")).status == 404
    assert (await client.delete("/v1/profiles/ida")).status == 404
    assert (await put_profile(client, "ida", {"display_name": "new"}, png(14), {"If-None-Match": "*"})).status == 202


async def test_out_of_range_versions_are_404_not_errors(client: Client) -> None:
    for version in ("99999999999999999999", "0", "\u00b2", "-1"):
        response = await client.get(f"/v1/profiles/ada/versions/{version}/image")
        assert response.status == 404, version


async def test_prefer_wait_answers_200_with_the_profile_once_it_is_live(
    client: Client,
    start_worker: StartWorker,
) -> None:
    await start_worker()
    response = await put_profile(client, "lea", {"display_name": "Lea"}, png(9), {"Prefer": "wait=20"})
    assert response.status == 200
    assert response.headers["Preference-Applied"] == "wait=20"
    body = await response.json()
    assert body["version"] == 1 and body["metadata"] == {"display_name": "Lea"}


async def test_prefer_wait_without_a_worker_falls_back_to_202(client: Client) -> None:
    response = await put_profile(client, "max", {"display_name": "Max"}, png(10), {"Prefer": "wait=1"})
    assert response.status == 202
    assert "Preference-Applied" not in response.headers


async def test_conditional_reads_answer_304_for_the_current_etag(
    client: Client,
    start_worker: StartWorker,
) -> None:
    await start_worker()
    await accepted(client, "ned", {"display_name": "Ned"}, png(11))
    await wait_live(client, "ned", 1)
    profile = await client.get("/v1/profiles/ned")
    assert profile.headers["ETag"] == '"1"'
    assert (await client.get("/v1/profiles/ned", headers={"If-None-Match": '"1"'})).status == 304
    image = await client.get("/v1/profiles/ned/image")
    etag = image.headers["ETag"]
    assert (await client.get("/v1/profiles/ned/image", headers={"If-None-Match": etag})).status == 304
    for path in ("/v1/profiles/ned/image", "/v1/profiles/ned/versions/1/image"):
        head = await client.head(path)
        assert head.status == 200 and head.headers["Content-Length"] == str(len(png(11)))
        assert head.headers["ETag"] == etag
    await accepted(client, "ned", {"display_name": "Ned 2"}, png(12))
    await wait_live(client, "ned", 2)
    assert (await client.get("/v1/profiles/ned", headers={"If-None-Match": '"1"'})).status == 200


async def test_an_intent_reports_its_state_and_unknown_ones_are_404(client: Client) -> None:
    body = await accepted(client, "ola", {"display_name": "Ola"}, png(13))
    intent: dict[str, Any] = await (await client.get(body["status_url"])).json()
    assert intent["state"] == "pending" and intent["attempts"] == 0 and intent["max_attempts"] == 10
    assert intent["user_id"] == "ola" and intent["version"] == 1 and intent["last_error"] is None
    assert (await client.get("/v1/intents/00000000-0000-0000-0000-000000000000")).status == 404
    assert (await client.get("/v1/intents/not-a-uuid")).status == 404


async def test_health_readiness_and_the_openapi_document_of_every_route(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and await ready.json() == {"database": "ok", "blob_store": "ok"}
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    routes = {route.resource.canonical for route in client.app.router.routes() if route.resource is not None}
    # The operator console's pages are for browsers, not part of the API (tests/test_console.py).
    assert {route for route in routes if not route.startswith("/admin")} == set(document["paths"])
    assert {"ProfileOut", "AcceptedOut", "IntentOut", "ProblemOut", "Metadata"} <= set(
        document["components"]["schemas"]
    )


async def test_unknown_routes_answer_problem_json(client: Client) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status == 404 and response.content_type == "application/problem+json"
    response = await client.post("/v1/profiles/ada")
    assert response.status == 405 and response.content_type == "application/problem+json"


async def test_reads_of_many_users_in_parallel_stay_separate(client: Client, start_worker: StartWorker) -> None:
    await start_worker()
    users = [f"user-{i}" for i in range(6)]
    # One after another: a burst of writes on a fresh pool opens its connections at once, which on a
    # loaded machine can outlast the tests' 2 s acquire timeout (a fast 503, as designed; not the point).
    for i, user in enumerate(users):
        await accepted(client, user, {"display_name": user}, png(200 + i))
    for user in users:
        await wait_live(client, user, 1)
    bodies = await asyncio.gather(*(client.get(f"/v1/profiles/{user}") for user in users))
    for user, response in zip(users, bodies, strict=True):
        assert (await response.json())["metadata"]["display_name"] == user

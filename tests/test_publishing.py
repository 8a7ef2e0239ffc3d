"""Batched publishing: one fenced statement for many intents, each row decided on its own fence."""

from __future__ import annotations

import asyncio

import pytest

from service.core import metrics, repository
from service.core.domain import IntentState
from service.core.lifecycle import Shutdown
from service.core.repository import Claim, Pool
from service.core.settings import Settings
from tests.support import WAIT_SECONDS, Client, MakeClient, accepted, intent_row, made, png, put_profile, until_blocked
from workers.outbox import run_worker
from workers.publisher import Publisher


async def claims_for(client: Client, pool: Pool, settings: Settings, users: list[str]) -> list[Claim]:
    for n, user in enumerate(users):
        await accepted(client, user, {"display_name": user}, png(1200 + n))
    claims = await repository.claim_intents(pool, len(users), "test", settings.lease_seconds)
    assert [claim.user_id for claim in claims] == users
    return claims


def published_batches() -> tuple[float, float]:
    """How many batches this process has published, and how many intents they held."""
    samples = {s.name: s.value for metric in metrics.PUBLISH_BATCH.collect() for s in metric.samples}
    return samples["profiles_publish_batch_intents_count"], samples["profiles_publish_batch_intents_sum"]


async def live_of(pool: Pool, user: str) -> int | None:
    live: int | None = await pool.fetchval("SELECT live_version FROM profiles WHERE user_id = $1", user)
    return live


async def test_a_batch_publishes_each_row_on_its_own_fence_and_leaves_out_the_one_that_lost_its_lease(
    client: Client, pool: Pool, settings: Settings
) -> None:
    ann, bob, cid = await claims_for(client, pool, settings, ["ann", "bob", "cid"])
    # Another worker took bob's intent over: the lease in this claim is no longer the current one.
    await pool.execute("UPDATE intents SET lease_token = gen_random_uuid() WHERE id = $1", bob.id)

    published = await repository.publish_intents(pool, [made(ann), made(bob), made(cid)])

    assert published.states == {ann.id: IntentState.DONE, cid.id: IntentState.DONE}
    assert published.busy == frozenset()
    assert (await live_of(pool, "ann"), await live_of(pool, "bob"), await live_of(pool, "cid")) == (1, None, 1)
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", bob.id) == IntentState.IN_PROGRESS


async def test_a_batch_refuses_two_intents_of_one_user_and_changes_nothing(
    client: Client, pool: Pool, settings: Settings
) -> None:
    first, second = await claims_for(client, pool, settings, ["dee", "dee"])
    with pytest.raises(ValueError, match="one intent per user"):
        await repository.publish_intents(pool, [made(first), made(second)])
    assert await live_of(pool, "dee") is None


async def test_attempts_finishing_together_are_published_by_one_statement(
    client: Client, pool: Pool, settings: Settings
) -> None:
    claims = await claims_for(client, pool, settings, ["eve", "fay", "gus"])
    publisher = Publisher(pool, max_batch=8)
    before = published_batches()

    states = await asyncio.gather(*(publisher.publish(made(claim)) for claim in claims))

    assert states == [IntentState.DONE] * 3
    batches, intents = published_batches()
    assert (batches - before[0], intents - before[1]) == (1, 3)


async def test_a_users_second_intent_waits_for_the_next_batch_and_the_newer_version_stays_live(
    client: Client, pool: Pool, settings: Settings
) -> None:
    older, newer = await claims_for(client, pool, settings, ["hal", "hal"])
    publisher = Publisher(pool, max_batch=8)
    before = published_batches()

    states = await asyncio.gather(publisher.publish(made(newer)), publisher.publish(made(older)))

    assert [*states] == [IntentState.DONE, IntentState.SUPERSEDED]
    assert await live_of(pool, "hal") == newer.version
    assert published_batches()[0] - before[0] == 2


LOCKS_A_PROFILE = "FROM profiles p\nWHERE p.user_id = $1\nFOR UPDATE"


async def test_a_profile_another_transaction_holds_delays_only_its_own_intent(
    client: Client, pool: Pool, settings: Settings
) -> None:
    na, nb, nc = await claims_for(client, pool, settings, ["na", "nb", "nc"])
    publisher = Publisher(pool, max_batch=8)
    async with pool.acquire() as blocker, blocker.transaction():
        await repository.lock_existing_profile(blocker, "nb")
        first = [asyncio.create_task(publisher.publish(made(claim))) for claim in (na, nb)]
        # nb's intent came back busy and waits for its profile on its own; the batches go on.
        await until_blocked(pool, what="nb's publish to wait for its profile", statement=LOCKS_A_PROFILE)
        assert await first[0] is IntentState.DONE
        assert await publisher.publish(made(nc)) is IntentState.DONE
        assert not first[1].done()
        # A write of a user whose intent was in that batch is not held up either.
        response = await put_profile(client, "na", {"display_name": "na again"}, png(1300))
        assert response.status == 202
    assert await first[1] is IntentState.DONE
    assert (await live_of(pool, "na"), await live_of(pool, "nb"), await live_of(pool, "nc")) == (1, 1, 1)


async def test_a_second_stop_request_returns_while_a_publish_still_waits_for_a_profile(
    make_client: MakeClient, pool: Pool, settings: Settings
) -> None:
    client = await make_client(settings)
    body = await accepted(client, "xa", {"display_name": "xa"}, png(1301))
    shutdown = Shutdown()
    async with pool.acquire() as blocker, blocker.transaction():
        await repository.lock_existing_profile(blocker, "xa")
        running = asyncio.create_task(run_worker(settings, shutdown))
        await until_blocked(pool, what="xa's publish to wait for its profile", statement=LOCKS_A_PROFILE)
        shutdown.request()
        shutdown.request()
        done, _ = await asyncio.wait([running], timeout=WAIT_SECONDS)
        assert done == {running}
    row = await intent_row(settings.database_url, body["intent_id"])
    assert (row["state"], row["attempts"]) == ("pending", 0)  # handed back, its attempt refunded

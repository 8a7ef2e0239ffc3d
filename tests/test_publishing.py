"""Batched publishing: one fenced statement for many intents, each row decided on its own fence."""

from __future__ import annotations

import asyncio

import pytest

from service.core import metrics, repository
from service.core.domain import IntentState
from service.core.repository import Claim, Pool
from service.core.settings import Settings
from tests.support import Client, accepted, png
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

    states = await repository.publish_intents(pool, [ann, bob, cid])

    assert states == {ann.id: IntentState.DONE, cid.id: IntentState.DONE}
    assert (await live_of(pool, "ann"), await live_of(pool, "bob"), await live_of(pool, "cid")) == (1, None, 1)
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", bob.id) == IntentState.IN_PROGRESS


async def test_a_batch_refuses_two_intents_of_one_user_and_changes_nothing(
    client: Client, pool: Pool, settings: Settings
) -> None:
    first, second = await claims_for(client, pool, settings, ["dee", "dee"])
    with pytest.raises(ValueError, match="one intent per user"):
        await repository.publish_intents(pool, [first, second])
    assert await live_of(pool, "dee") is None


async def test_attempts_finishing_together_are_published_by_one_statement(
    client: Client, pool: Pool, settings: Settings
) -> None:
    claims = await claims_for(client, pool, settings, ["eve", "fay", "gus"])
    publisher = Publisher(pool, max_batch=8)
    before = published_batches()

    states = await asyncio.gather(*(publisher.publish(claim) for claim in claims))

    assert states == [IntentState.DONE] * 3
    batches, intents = published_batches()
    assert (batches - before[0], intents - before[1]) == (1, 3)


async def test_a_users_second_intent_waits_for_the_next_batch_and_the_newer_version_stays_live(
    client: Client, pool: Pool, settings: Settings
) -> None:
    older, newer = await claims_for(client, pool, settings, ["hal", "hal"])
    publisher = Publisher(pool, max_batch=8)
    before = published_batches()

    states = await asyncio.gather(publisher.publish(newer), publisher.publish(older))

    assert [*states] == [IntentState.DONE, IntentState.SUPERSEDED]
    assert await live_of(pool, "hal") == newer.version
    assert published_batches()[0] - before[0] == 2

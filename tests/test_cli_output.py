"""The operator commands' own presentation of intents."""

from __future__ import annotations

import pytest

from service.api.schemas import AdminIntentOut
from service.cli import console
from service.cli.main import main as profiles
from service.core import repository
from service.core.repository import IntentFilter, Pool
from service.core.settings import Settings
from tests.support import Client, accepted, png


async def test_the_command_line_shows_intents_exactly_as_the_admin_api_renders_them(
    client: Client, settings: Settings, pool: Pool
) -> None:
    for n in range(3):
        await accepted(client, f"cli{n}", {"display_name": "C"}, png(906 + n))
    await repository.claim_intents(pool, 1, "someone", settings.lease_seconds)
    # Timestamps with and without a fraction, and one with trailing zeros.
    await pool.execute("UPDATE intents SET created_at = date_trunc('second', created_at) WHERE user_id = 'cli1'")
    await pool.execute("UPDATE intents SET updated_at = date_trunc('second', updated_at) + interval '0.1 s'")
    listed = await repository.list_intents(pool, IntentFilter(), 10)
    assert len(listed) == 3
    for intent in listed:
        assert console._intent_row(intent) == AdminIntentOut.of_listed(intent).model_dump(mode="json")
        assert list(console._intent_row(intent)) == list(AdminIntentOut.model_fields)


def test_an_unknown_state_on_the_command_line_is_refused_naming_the_states_as_they_are_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        profiles(["intents", "list", "--state", "bogus"])
    assert "(choose from 'pending', 'in_progress', 'done', 'superseded', 'dead', 'stuck')" in capsys.readouterr().err

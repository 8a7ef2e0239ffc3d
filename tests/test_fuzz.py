"""Schemathesis against the served /openapi.json: no request gets a 5xx, every response matches the document.

Bounded and deterministic: a fixed number of derandomized cases per operation and mode, no example database.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image
from pydantic import SecretStr
from schemathesis import Case, CheckFunction, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api import openapi
from service.core.settings import Settings
from tests.support import ADMIN_SCOPE, JWT_SECRET, MakeClient, StartWorker, bearer, png, put_profile, wait_live

# Per operation and generation mode: the whole module stays under a minute on two cores.
MAX_EXAMPLES = 100
SEEDED_USER = "fuzz-seed"

OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in openapi.document()["paths"].items()
    for method in item
    if method != "parameters"
]

# Any 5xx is a failure: the stores are up, so even 503 would be a bug here.
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Invalid input must be refused, with one of the statuses the API uses for that: 413 is an oversized metadata
# part, a malformed intent id or version is 404 (it cannot name anything) rather than 400, and a request
# stripped of its token or given a malformed one is 401.
REFUSALS = [400, 401, 404, 413, 415, 422]

FUZZING = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run: a failure in CI reproduces locally
    database=None,
    deadline=None,  # requests go through PostgreSQL and S3; their latency says nothing about correctness
    # Health checks are about generation speed; MAX_EXAMPLES is the budget that matters here.
    suppress_health_check=list(hypothesis.HealthCheck),
)


def _image(fmt: str, shade: int, width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 7)).save(out, fmt)
    return out.getvalue()


# Random bytes in the `image` part would only ever test the 415 path: real small images of every accepted type
# let valid uploads through to 202. Schemathesis picks them by the part's declared encoding contentType.
for _fmt, _media_type in [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif")]:
    schemathesis.openapi.media_type(
        _media_type, st.builds(_image, st.just(_fmt), st.integers(0, 255), st.integers(1, 64), st.integers(1, 64))
    )


def _run_cases(cases: st.SearchStrategy[Case[Any]], check: Callable[[Case[Any]], None]) -> None:
    @FUZZING
    @hypothesis.given(case=cases)
    def run(case: Case[Any]) -> None:
        check(case)

    run()


def fuzz(base_url: str, label: str, seeded: dict[str, Any], headers: dict[str, str]) -> int:
    """Runs the operation's cases against a live server (blocking); returns how many requests were made."""
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    # Random ids almost never name anything, so some positive cases use ones that exist: that is what
    # reaches the 200 and 304 responses and their schemas.
    existing = {name: value for name, value in seeded.items() if f"{{{name}}}" in operation.path}
    calls = 0

    with requests.Session() as session:

        def call(case: Case[Any], checks: list[CheckFunction]) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=base_url, session=session, headers=headers, checks=checks)

        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
        if existing:
            positive |= operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=existing)
        # A random Prefer value never says wait=<n>, and only that reaches PUT's 200 (published in time).
        if operation.get_parameter("Prefer", "header") is not None:
            positive |= operation.as_strategy(generation_mode=GenerationMode.POSITIVE, headers={"Prefer": "wait=5"})
        _run_cases(positive, lambda case: call(case, CHECKS))
        # An operation without parameters or body has no invalid input to send.
        if any(True for _ in operation.iter_parameters()) or operation.body:
            negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            _run_cases(negative, lambda case: call(case, [*CHECKS, negative_data_rejection]))
    return calls


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis caches what it learns under ./.hypothesis; keep that out of the repository."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.mark.parametrize("label", OPERATIONS)
async def test_operation_never_answers_5xx_and_always_as_documented(
    label: str, make_client: MakeClient, settings: Settings, start_worker: StartWorker, hypothesis_home: None
) -> None:
    # Every request carries an operator's token, so that writes to any user and the admin routes get past
    # authentication; 401 and 403 have their own tests, and write rate limits are off in the test settings.
    client = await make_client(settings.model_copy(update={"auth_jwt_secret": SecretStr(JWT_SECRET)}))
    operator = bearer("fuzz-operator", scope=ADMIN_SCOPE)
    await start_worker()  # accepted uploads get published, so Prefer: wait can answer 200 with a profile
    response = await put_profile(client, SEEDED_USER, {"display_name": "Seed"}, png(1), operator)
    assert response.status == 202, await response.text()
    intent_id = (await response.json())["intent_id"]
    await wait_live(client, SEEDED_USER, 1)
    seeded = {"user_id": SEEDED_USER, "version": 1, "intent_id": intent_id}
    # Schemathesis is synchronous: it runs in a thread while this loop serves its requests.
    calls = await asyncio.to_thread(fuzz, str(client.make_url("")).rstrip("/"), label, seeded, operator)
    assert calls > 0

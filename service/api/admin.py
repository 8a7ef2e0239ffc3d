"""Operator routes under /v1/admin: list, show and replay intents. Every request needs a token
with the admin scope (see service/api/auth.py)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from datetime import datetime

from aiohttp import web
from pydantic import ValidationError

from service.api import access
from service.api.problems import Problem, not_found, validation_errors
from service.api.schemas import AdminIntentOut, BulkReplayIn, BulkReplayOut, IntentPageOut, ReplayOut
from service.api.state import POOL, SETTINGS
from service.core import operations
from service.core.domain import INTENT_SELECTIONS, MAX_INTENT_AGE_SECONDS, USER_ID_RULE, is_valid_user_id
from service.core.operations import ReplayOutcome
from service.core.repository import IntentFilter

MAX_PAGE = 500
# Each replay is its own transaction; a bounded batch per call keeps a call inside the request
# deadline. Call again while `remaining` is not 0.
MAX_BULK_REPLAY = 500


def _invalid(detail: str) -> Problem:
    return Problem(400, "Invalid query", detail, slug="invalid-query")


def only(request: web.Request, *allowed: str) -> None:
    """Refuse a query parameter the route does not know: a misspelt filter (`?stat=dead`) must not
    silently list, or bulk-act on, everything."""
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise _invalid(f"unknown query parameter(s): {', '.join(map(repr, unknown))}; known: {', '.join(allowed)}")


def encode_cursor(created_at: datetime, intent_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{intent_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, intent_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(intent_id)
    except ValueError:
        raise _invalid("the cursor is not one this API handed out") from None


def intent_filter(values: Mapping[str, str]) -> IntentFilter:
    """The filter of query parameters (or a form): state, user_id, older_than_seconds; 400 when one is invalid."""
    state = values.get("state")
    if state is not None and state not in INTENT_SELECTIONS:
        raise _invalid(f"state must be one of {', '.join(INTENT_SELECTIONS)}")
    older = values.get("older_than_seconds")
    try:
        older_than = None if older is None else float(older)
    except ValueError:
        raise _invalid("older_than_seconds must be a number") from None
    if older_than is not None and not 0 <= older_than <= MAX_INTENT_AGE_SECONDS:  # also refuses nan and inf
        raise _invalid(f"older_than_seconds must be between 0 and {MAX_INTENT_AGE_SECONDS}")
    user_id = values.get("user_id")
    if user_id is not None and not is_valid_user_id(user_id):
        raise _invalid(USER_ID_RULE)
    return IntentFilter(state=state, user_id=user_id, older_than_seconds=older_than)


async def list_intents(request: web.Request) -> web.Response:
    await access.check_admin(request)
    only(request, "state", "user_id", "older_than_seconds", "limit", "cursor")
    where = intent_filter(request.query)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise _invalid("limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise _invalid(f"limit must be between 1 and {MAX_PAGE}")
    cursor = request.query.get("cursor")
    after = None if cursor is None else decode_cursor(cursor)
    page = await operations.list_intents(request.app[POOL], where, limit + 1, after)
    more = len(page) > limit
    items = page[:limit]
    next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if more else None
    body = IntentPageOut(items=[AdminIntentOut.of_listed(i) for i in items], next_cursor=next_cursor)
    return web.json_response(body.model_dump(mode="json"))


def _intent_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["intent_id"])
    except ValueError:
        raise not_found("no such intent") from None


async def show_intent(request: web.Request) -> web.Response:
    await access.check_admin(request)
    found = await operations.show_intent(request.app[POOL], _intent_id(request))
    if found is None:
        raise not_found("no such intent")
    return web.json_response(AdminIntentOut.of_listed(found).model_dump(mode="json"))


async def replay_one(request: web.Request) -> web.Response:
    await access.check_admin(request)
    only(request, "dry_run")
    intent_id = _intent_id(request)
    dry_run = request.query.get("dry_run", "false").lower() in {"1", "true", "yes"}
    outcome = await operations.replay(request.app[POOL], request.app[SETTINGS], intent_id, dry_run=dry_run)
    if outcome is ReplayOutcome.NOT_FOUND:
        raise not_found("no such intent")
    if outcome.refused:
        raise Problem(
            409,
            "Not replayable",
            f"intent {intent_id} cannot be replayed: {outcome.value}",
            slug="not-replayable",
            errors=[{"field": "outcome", "message": outcome.value}],
        )
    return web.json_response(ReplayOut(intent_id=intent_id, outcome=outcome).model_dump(mode="json"))


async def replay_many(request: web.Request) -> web.Response:
    await access.check_admin(request)
    try:
        wanted = BulkReplayIn.model_validate_json(await request.read())
    except ValidationError as exc:
        raise Problem(
            422, "Invalid replay request", "the body does not follow the schema", errors=validation_errors(exc)
        ) from None
    pool, settings = request.app[POOL], request.app[SETTINGS]
    where = IntentFilter(state=wanted.state, user_id=wanted.user_id, older_than_seconds=wanted.older_than_seconds)
    results: list[ReplayOut] = []
    ids = await operations.replayable_ids(pool, where)
    outcomes = await operations.replay_all(
        pool,
        settings,
        ids[:MAX_BULK_REPLAY],
        dry_run=wanted.dry_run,
        progress=lambda intent_id, outcome: results.append(ReplayOut(intent_id=intent_id, outcome=outcome)),
    )
    body = BulkReplayOut(
        outcomes={k.value: v for k, v in outcomes.items()},
        intents=results,
        remaining=max(0, len(ids) - MAX_BULK_REPLAY),
    )
    return web.json_response(body.model_dump(mode="json"))


def add_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.get("/v1/admin/intents", list_intents),
            web.post("/v1/admin/intents/replay", replay_many),
            web.get("/v1/admin/intents/{intent_id}", show_intent),
            web.post("/v1/admin/intents/{intent_id}/replay", replay_one),
        ]
    )

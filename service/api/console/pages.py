"""The console's pages and forms. Handlers read and act only through service.core.operations and
render templates; every page reads fully without JavaScript, and htmx polls the parts that change."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from service.api import admin
from service.api.auth import InvalidToken, NotAllowed
from service.api.console.security import (
    COOKIE,
    CSRF_FIELD,
    SAFE_METHODS,
    Access,
    CsrfRefused,
    Handler,
    Session,
    Sessions,
    check_csrf,
    security_headers,
)
from service.api.console.views import FILTERS, rate_chart
from service.api.jwks import KeysUnavailable
from service.api.problems import Problem
from service.api.state import AUTH, BLOBS, POOL, SETTINGS
from service.core import operations, profiles
from service.core.domain import (
    FINISHED_STATES,
    INTENT_SELECTIONS,
    USER_ID_RULE,
    IntentState,
    JobState,
    Replayable,
    is_valid_user_id,
)
from service.core.operations import JobTokenReused, ReplayOutcome
from service.core.profiles import BlobUnavailable, ProfileNotFound
from service.core.repository import DATABASE_UNAVAILABLE
from service.core.settings import Settings

log = logging.getLogger(__name__)

PAGE_SIZE = 50
SESSIONS = web.AppKey("console_sessions", Sessions)
ACCESS = web.AppKey("console_access", Access)
SESSION = web.RequestKey("console_session", Session)
# A handler that signs someone in or out puts the new session here; the middleware sends it.
NEW_SESSION = web.RequestKey("console_new_session", Session)
UNAVAILABLE: tuple[type[BaseException], ...] = (*DATABASE_UNAVAILABLE, BlobUnavailable, KeysUnavailable)
# Routes anyone may reach, signed in or not.
PUBLIC_ROUTES = frozenset({"signin", "signin_post", "static"})
# Age filters offered by the intents page, in seconds (the admin API takes any number).
AGES = {
    "": "any age",
    "60": "older than 1 min",
    "600": "older than 10 min",
    "3600": "older than 1 h",
    "86400": "older than 1 day",
}
# Who acted, in logs and on jobs, when the console is open (development mode, nobody signs in).
NOBODY = "development"
JOB_TOKEN = re.compile(r"[0-9a-f]{32}")
# A target after signing in: a console path of printable ASCII without a backslash.
SAFE_NEXT = re.compile(r"/admin/[!-\[\]-~]*")
FILTER_FIELDS = ("state", "user_id", "older_than_seconds")


def _is_htmx(request: web.Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _session(request: web.Request) -> Session:
    session: Session = request[SESSION]
    return session


def page(
    request: web.Request, template: str, context: Mapping[str, Any], status: int = 200, *, polled: bool = False
) -> web.Response:
    """A page; for htmx polling a page that has one, only its polled part (the template of the same
    name with a leading _)."""
    name = f"_{template}" if polled and _is_htmx(request) else template
    common = {
        "session": request.get(SESSION),
        "access": request.config_dict[ACCESS],
        "csrf_field": CSRF_FIELD,
        "request": request,
        "nav": "",
    }
    return aiohttp_jinja2.render_template(name, request, {**common, **context}, status=status)


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _error(
    request: web.Request, status: int, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = page(request, "error.html", {"status": status, "title": title, "detail": detail}, status)
    response.headers.update(headers or {})
    return response


@web.middleware
async def html_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Failures of the console are pages (a conflict or an outage never blanks it with JSON)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except Problem as exc:
        return _error(request, exc.status, exc.title, exc.detail, exc.headers)
    except CsrfRefused:
        detail = "This form did not come from this console session (no valid CSRF token). Reload the page and retry."
        return _error(request, 403, "Refused", detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(request, exc.status, exc.reason, exc.text or exc.reason)
    except UNAVAILABLE as exc:
        log.warning("%s %s: %r", request.method, request.path, exc)
        retry_after = str(request.config_dict[SETTINGS].retry_after_seconds)
        detail = "A store the console reads is unavailable; retry in a moment."
        return _error(request, 503, "Unavailable", detail, {"Retry-After": retry_after})
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(request, 500, "Internal error", "The page failed unexpectedly; it has been logged.")


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Load or start the session, refuse state changes without its CSRF token, and send visitors
    who must sign in to the sign-in form."""
    route = request.match_info.route.name
    if route == "static":
        response: web.StreamResponse = await handler(request)
        return response
    store, access = request.config_dict[SESSIONS], request.config_dict[ACCESS]
    if access in SHUT:
        return _error(request, 403, "The console is off", SHUT[access])
    loaded = await store.load(request.config_dict[POOL], request.cookies.get(COOKIE))
    request[SESSION] = session = loaded or Session.anonymous(store.lifetime)
    if request.method not in SAFE_METHODS:
        await check_csrf(request, session)
    if access is Access.SIGN_IN and session.subject is None and route not in PUBLIC_ROUTES:
        response = _to_sign_in(request)
    else:
        response = await handler(request)
    new = request.get(NEW_SESSION)
    if new is not None or loaded is None:
        store.set_cookie(request, response, new or session)
    return response


# Why the console is shut, by access mode.
SHUT = {
    Access.OFF: (
        "This API runs in production mode without authentication (PROFILES_AUTH_ALLOW_OFF): the console cannot "
        "check who signs in, so it stays shut. Set PROFILES_AUTH_JWT_SECRET or PROFILES_AUTH_JWKS_URL to sign in "
        "with an admin token, or run in development mode."
    ),
    Access.NO_SECRET: (
        "PROFILES_CONSOLE_SECRET is not set: without it each API replica would sign the console's sessions and "
        "forms with a key of its own, so the console stays shut. Set it (at least 32 characters, the same on "
        "every replica) and restart."
    ),
}


def _to_sign_in(request: web.Request) -> web.Response:
    target = "/admin/signin"
    if request.method in SAFE_METHODS:
        target += f"?next={quote(request.rel_url.path_qs, safe='/')}"
    if _is_htmx(request):
        # A polled fragment must not become a sign-in form inside the page: htmx loads the whole page.
        return web.Response(status=200, headers={"HX-Redirect": target})
    return see_other(target)


# --- pages -------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    found = await operations.overview(request.config_dict[POOL], request.config_dict[SETTINGS].gc_grace_seconds)
    context = {"o": found, "chart": rate_chart(found.per_minute), "nav": "overview"}
    return page(request, "overview.html", context, polled=True)


def _given(values: Mapping[str, str], *names: str) -> dict[str, str]:
    """The fields a form filled in: an empty field (the "any" choice) is no filter."""
    return {name: values[name] for name in names if values.get(name)}


async def intents(request: web.Request) -> web.Response:
    admin.only(request, *FILTER_FIELDS, "cursor")
    chosen = _given(request.query, *FILTER_FIELDS)
    where = admin.intent_filter(chosen)
    cursor = request.query.get("cursor")
    after = admin.decode_cursor(cursor) if cursor else None
    found = await operations.list_intents(request.config_dict[POOL], where, PAGE_SIZE + 1, after)
    shown = found[:PAGE_SIZE]
    next_cursor = admin.encode_cursor(shown[-1].created_at, shown[-1].id) if len(found) > PAGE_SIZE else None
    context = {
        "intents": shown,
        "chosen": chosen,
        "next_query": {**chosen, "cursor": next_cursor} if next_cursor else None,
        "states": INTENT_SELECTIONS,
        "ages": AGES,
        "bulk": where.state in set(Replayable),
        "job_token": uuid.uuid4().hex,
        "paged": cursor is not None,
        "page_size": PAGE_SIZE,
        "nav": "intents",
    }
    return page(request, "intents.html", context, polled=True)


def _intent_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["intent_id"])
    except ValueError:
        raise web.HTTPNotFound(text="There is no such intent.") from None


async def intent(request: web.Request) -> web.Response:
    intent_id = _intent_id(request)
    found = await operations.intent_detail(request.config_dict[POOL], intent_id)
    if found is None:
        raise web.HTTPNotFound(text=f"There is no intent {intent_id} (finished intents are pruned after a while).")
    outcome = request.query.get("outcome")
    context = {
        "d": found,
        "outcome": ReplayOutcome(outcome) if outcome in set(ReplayOutcome) else None,
        "watching": found.intent.state not in FINISHED_STATES,
        "replayable": found.intent.state == IntentState.DEAD
        or (found.intent.state == IntentState.IN_PROGRESS and not found.intent.leased),
        "nav": "intents",
    }
    return page(request, "intent.html", context, polled=True)


async def replay_one(request: web.Request) -> web.Response:
    intent_id = _intent_id(request)
    config = request.config_dict
    outcome = await operations.replay(config[POOL], config[SETTINGS], intent_id)
    if outcome is ReplayOutcome.NOT_FOUND:
        raise web.HTTPNotFound(text=f"There is no intent {intent_id}.")
    log.info("console: %s replayed intent %s: %s", _session(request).subject or NOBODY, intent_id, outcome)
    return see_other(f"/admin/intents/{intent_id}?outcome={outcome.value}")


async def replay_many(request: web.Request) -> web.Response:
    form = {name: value for name, value in (await request.post()).items() if isinstance(value, str)}
    token = form.get("job_token", "")
    if not JOB_TOKEN.fullmatch(token):
        raise Problem(400, "Invalid form", "the form carries no job token; reload the intents page")
    where = admin.intent_filter(_given(form, *FILTER_FIELDS))
    requested_by = _session(request).subject or NOBODY
    try:
        job_id = await operations.submit_replay_job(request.config_dict[POOL], token, where, requested_by)
    except JobTokenReused as exc:
        detail = f"{exc}. Reload the intents page to ask for this one."
        raise Problem(422, "Form already used", detail) from None
    except ValueError as exc:
        raise Problem(400, "Not replayable in bulk", str(exc)) from None
    return see_other(f"/admin/replays/{job_id}")


async def replay_job(request: web.Request) -> web.Response:
    try:
        job_id = uuid.UUID(request.match_info["job_id"])
    except ValueError:
        raise web.HTTPNotFound(text="There is no such replay job.") from None
    report = await operations.job_report(request.config_dict[POOL], job_id)
    if report is None:
        raise web.HTTPNotFound(text=f"There is no replay job {job_id} (finished jobs are pruned after a while).")
    context = {
        "r": report,
        "watching": report.job.state is not JobState.DONE,
        "shown": operations.JOB_INTENTS_SHOWN,
        "nav": "intents",
    }
    return page(request, "job.html", context, polled=True)


def _user_id(value: str) -> str:
    if not is_valid_user_id(value):
        raise Problem(400, "Invalid user id", USER_ID_RULE)
    return value


async def find_profile(request: web.Request) -> web.Response:
    admin.only(request, "user_id")
    return see_other(f"/admin/profiles/{_user_id(request.query.get('user_id', '').strip())}")


async def profile(request: web.Request) -> web.Response:
    user_id = _user_id(request.match_info["user_id"])
    found = await operations.profile_view(request.config_dict[POOL], user_id)
    if found is None:
        raise web.HTTPNotFound(text=f"Nobody called {user_id!r} ever wrote a profile.")
    watching = any(v.intent_state is not None and v.intent_state not in FINISHED_STATES for v in found.versions)
    context = {"p": found, "watching": watching, "shown": operations.PROFILE_VERSIONS_SHOWN, "nav": "profiles"}
    return page(request, "profile.html", context, polled=True)


async def version_image(request: web.Request) -> web.Response:
    """A published version's image for the profile page (the same rules as the public route)."""
    user_id, number = _user_id(request.match_info["user_id"]), request.match_info["version"]
    config = request.config_dict
    try:
        _, image, data = await profiles.read_version_image(config[POOL], config[BLOBS], user_id, int(number))
    except ProfileNotFound:
        raise web.HTTPNotFound(text="That image is gone.") from None
    return web.Response(body=data, content_type=image.content_type, headers={"Cache-Control": "private, max-age=60"})


# --- signing in --------------------------------------------------------------------------------


def _next(value: str | None) -> str:
    """Where to go after signing in: a console page, never another site, and nothing a Location
    header cannot carry (a line break would split it)."""
    if value and SAFE_NEXT.fullmatch(value) and not value.startswith("/admin//"):
        return value
    return "/admin/"


async def sign_in_form(request: web.Request) -> web.Response:
    if request.config_dict[ACCESS] is not Access.SIGN_IN:
        return see_other("/admin/")
    return page(request, "signin.html", {"next": _next(request.query.get("next")), "message": None})


async def sign_in(request: web.Request) -> web.Response:
    if request.config_dict[ACCESS] is not Access.SIGN_IN:
        return see_other("/admin/")
    form = await request.post()
    token, target = form.get("token"), _next(str(form.get("next", "")))
    message, status = None, 200
    try:
        if not isinstance(token, str) or not token.strip():
            raise InvalidToken("paste an access token")
        identity = await request.config_dict[AUTH].verify_admin(token)
        if identity.expires_at <= time.time():
            # Accepted within the clock leeway, but a session on it would end before it began.
            raise InvalidToken("that token has expired; get a new one")
    except InvalidToken as exc:
        message, status = f"That token was refused: {exc}.", 401
    except NotAllowed as exc:
        message, status = f"That token is valid but not an operator's: {exc}.", 403
    if message is not None:
        return page(request, "signin.html", {"next": target, "message": message}, status)
    store, pool = request.config_dict[SESSIONS], request.config_dict[POOL]
    await store.end(pool, _session(request))
    request[NEW_SESSION] = await store.sign_in(pool, identity)
    log.info("console: %s signed in", identity.subject)
    return see_other(target)


async def sign_out(request: web.Request) -> web.Response:
    store = request.config_dict[SESSIONS]
    await store.end(request.config_dict[POOL], _session(request))
    request[NEW_SESSION] = Session.anonymous(store.lifetime)
    return see_other("/admin/signin" if request.config_dict[ACCESS] is Access.SIGN_IN else "/admin/")


async def to_console(_request: web.Request) -> web.Response:
    return see_other("/admin/")


def console_app(settings: Settings) -> web.Application:
    """The console as a sub-application, to be mounted at /admin."""
    console = web.Application(middlewares=[security_headers, html_errors, sessions])
    console[SESSIONS] = Sessions(settings)
    console[ACCESS] = access = Access.of(settings)
    if access in SHUT:
        log.warning("the console at /admin/ is shut: %s", SHUT[access])
    aiohttp_jinja2.setup(
        console,
        loader=jinja2.PackageLoader("service.api.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters=FILTERS,
        default_helpers=False,
    )
    static = files("service.api.console").joinpath("static")
    console.router.add_static("/static/", str(static), name="static")
    console.router.add_routes(
        [
            web.get("", to_console),
            web.get("/", overview, name="overview"),
            web.get("/intents", intents),
            web.get("/intents/{intent_id}", intent),
            web.post("/intents/{intent_id}/replay", replay_one),
            web.post("/replays", replay_many),
            web.get("/replays/{job_id}", replay_job),
            web.get("/profiles", find_profile),
            web.get("/profiles/{user_id}", profile),
            web.get("/profiles/{user_id}/versions/{version:[0-9]{1,18}}/image", version_image),
            web.get("/signin", sign_in_form, name="signin"),
            web.post("/signin", sign_in, name="signin_post"),
            web.post("/signout", sign_out),
        ]
    )
    return console

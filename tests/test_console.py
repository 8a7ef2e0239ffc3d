"""The operator console at /admin/: in a real browser (headless Chromium) against a real API server,
PostgreSQL, S3 and worker, and its security and background jobs with plain HTTP and the database."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from service.api.app import create_app
from service.api.console.pages import PAGE_SIZE
from service.api.console.security import CONTENT_SECURITY_POLICY
from service.api.state import SETTINGS
from service.core import operations, repository
from service.core.blobstore import BlobStore
from service.core.domain import JobState, Replayable
from service.core.migrate import migrate
from service.core.operations import JobTokenReused, ReplayOutcome
from service.core.repository import IntentFilter, Pool
from service.core.settings import Settings
from service.dev.embedded import EmbeddedPostgres
from tests.support import (
    ADMIN_SCOPE,
    JWT_SECRET,
    ROOT,
    Browser,
    Client,
    MakeClient,
    StartWorker,
    accepted,
    bearer,
    eventually,
    finished_intent,
    kill_pending,
    png,
    publish_due,
    token,
    until_intents_finish,
)
from workers.maintenance import prune, reconcile

HTMX = ROOT / "service" / "api" / "console" / "static" / "vendor" / "htmx"
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
OPERATOR = token("ops-alice", scope=ADMIN_SCOPE)
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def secured(settings: Settings) -> Settings:
    """Production settings with authentication on and a console secret: the console needs an operator's token."""
    return settings.model_copy(
        update={"mode": "production", "auth_jwt_secret": SecretStr(JWT_SECRET), "console_secret": SecretStr("c" * 32)}
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies: each request carries exactly the session it is given."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@pytest.fixture
def own_postgres(scratch_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of the test's own, to stop and start again."""
    postgres = EmbeddedPostgres(scratch_dir / f"pg-console-{uuid.uuid4().hex[:8]}")
    postgres.start()
    migrate(postgres.url())
    yield postgres
    postgres.stop()


@pytest.fixture
async def server(secured: Settings) -> AsyncIterator[TestServer]:
    """The API on a real TCP port, for the browser."""
    server = TestServer(create_app(secured))
    await server.start_server()
    yield server
    await server.close()


async def write_profiles(server: TestServer, users: list[str], *, seed: int = 0) -> list[str]:
    """One accepted PUT per user (an admin token writes any profile); their intent ids."""
    async with aiohttp.ClientSession(headers=bearer("writer", scope=ADMIN_SCOPE)) as session:
        ids = []
        for n, user in enumerate(users):
            form = aiohttp.FormData()
            form.add_field("metadata", f'{{"display_name": "{user.title()}"}}', content_type="application/json")
            form.add_field("image", png(seed + n), filename="a.png", content_type="image/png")
            async with session.put(server.make_url(f"/v1/profiles/{user}"), data=form) as response:
                assert response.status == 202, await response.text()
                ids.append((await response.json())["intent_id"])
        return ids


async def counts_by_state(pool: Pool) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT CASE WHEN state = 'in_progress' AND next_attempt_at <= now() THEN 'stuck' ELSE state END AS s,"
        " count(*) AS n FROM intents GROUP BY 1"
    )
    return {row["s"]: row["n"] for row in rows}


async def sign_in(browser: Browser, server: TestServer, access_token: str = OPERATOR) -> None:
    await browser.open(str(server.make_url("/admin/")))
    await browser.script("document.getElementById('token').value = arguments[0]", access_token)
    await browser.script("document.getElementById('signin').submit()")
    await page_shows(browser, "document.readyState === 'complete' && !document.getElementById('signin')")


async def page_shows(browser: Browser, condition: str, what: str | None = None) -> Any:
    """Until the page makes the JavaScript expression `condition` truthy (the page changes as it
    polls: nothing to listen to from here)."""

    async def shown() -> Any:
        return await browser.script(f"return {condition}")

    return await eventually(shown, what=what or condition, timeout=15)


@contextlib.asynccontextmanager
async def watching_csp(browser: Browser) -> AsyncIterator[None]:
    """Every page opened meanwhile collects its Content-Security-Policy violations in
    window.violations (the watcher is injected by the browser itself, outside the page's policy)."""
    source = (
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));"
    )
    added = await browser.call(
        browser.driver.execute_cdp_cmd, "Page.addScriptToEvaluateOnNewDocument", {"source": source}
    )
    try:
        yield
    finally:
        await browser.call(browser.driver.execute_cdp_cmd, "Page.removeScriptToEvaluateOnNewDocument", added)


async def no_violations(browser: Browser) -> None:
    assert await browser.script("return window.violations") == []


# --- in the browser ------------------------------------------------------------------------------


async def test_an_operator_signs_in_with_an_admin_token_and_sees_the_counts_the_database_holds(
    browser: Browser, server: TestServer, pool: Pool
) -> None:
    ids = await write_profiles(server, ["ada", "bob", "cy"])
    await kill_pending(pool)
    await write_profiles(server, ["dee"], seed=10)
    await pool.execute("UPDATE intents SET state = 'in_progress', next_attempt_at = now() WHERE id = $1", ids[0])

    await browser.open(str(server.make_url("/admin/intents?state=dead")))
    assert "/admin/signin?next=/admin/intents%3Fstate%3Ddead" in await browser.script("return location.href")
    await browser.screenshot("console-signin")
    await browser.script("document.getElementById('token').value = arguments[0]", token("bob", scope="profiles:read"))
    await browser.script("document.getElementById('signin').submit()")
    message = await page_shows(browser, "document.getElementById('signin-message')?.textContent")
    assert "not an operator" in message

    await browser.script("document.getElementById('token').value = arguments[0]", OPERATOR)
    await browser.script("document.getElementById('signin').submit()")
    await page_shows(browser, "location.pathname === '/admin/intents' && location.search === '?state=dead'")
    await browser.open(str(server.make_url("/admin/")))
    shown = await browser.script(
        "return Object.fromEntries([...document.querySelectorAll('.counts [data-count]')]"
        ".map(e => [e.id.replace('count-', ''), Number(e.dataset.count)]))"
    )
    expected = await counts_by_state(pool)
    assert expected == {"dead": 2, "stuck": 1, "pending": 1}
    assert {state: shown[state] for state in ("pending", "in_progress", "stuck", "dead")} == {
        state: expected.get(state, 0) for state in ("pending", "in_progress", "stuck", "dead")
    }
    assert await browser.script("return document.getElementById('subject').textContent") == "ops-alice"
    cookie = (await browser.call(browser.driver.get_cookies))[0]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    await browser.screenshot("console-overview")


async def test_filtering_dead_intents_then_replaying_one_shows_it_done_without_reloading_the_page(
    browser: Browser, server: TestServer, pool: Pool, start_worker: StartWorker
) -> None:
    await write_profiles(server, ["ada", "bob"])
    await publish_due(server.app[SETTINGS])
    await write_profiles(server, ["ada", "bob", "cy"], seed=20)
    await kill_pending(pool)
    dead = {str(row["id"]) for row in await pool.fetch("SELECT id FROM intents WHERE state = 'dead'")}
    await start_worker()
    await sign_in(browser, server)
    async with watching_csp(browser):
        await replay_one_and_follow_it(browser, server, pool, dead)


async def replay_one_and_follow_it(browser: Browser, server: TestServer, pool: Pool, dead: set[str]) -> None:
    await browser.open(str(server.make_url("/admin/intents")))
    await browser.script("document.getElementById('filter-state').value = 'dead'")
    await browser.script("document.getElementById('filter-apply').click()")
    await page_shows(browser, "location.search === '?state=dead&user_id=&older_than_seconds='")
    listed = await browser.script("return [...document.querySelectorAll('tr[data-intent]')].map(r => r.dataset.intent)")
    assert set(listed) == dead
    assert await browser.script("return document.getElementById('bulk-replay') !== null")
    await browser.screenshot("console-intents")

    chosen = await pool.fetchval("SELECT id FROM intents WHERE state = 'dead' AND user_id = 'ada'")
    await browser.script(f"document.querySelector('tr[data-intent=\"{chosen}\"] a').click()")
    await page_shows(browser, "document.getElementById('intent-state')?.dataset.state === 'dead'")
    assert "S3 outage" in await browser.script("return document.getElementById('intent-error').textContent")
    await browser.screenshot("console-intent")

    await browser.script("document.getElementById('replay-one-submit').click()")
    await page_shows(browser, "document.getElementById('outcome')?.textContent.includes('Replayed')")
    await browser.script("window.sameDocument = true")
    await finished_intent(server.app[SETTINGS].database_url, str(chosen))
    await page_shows(browser, "document.getElementById('intent-state').dataset.state === 'done'", "shown as done")
    assert await browser.script("return window.sameDocument === true"), "the page was reloaded"
    await no_violations(browser)
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", chosen) == "done"

    await browser.script("document.getElementById('profile-link').click()")
    await page_shows(browser, "document.getElementById('live-version')?.dataset.version === '2'")
    loaded = await page_shows(
        browser,
        "[...document.images].length === 2 && [...document.images].every(i => i.complete && i.naturalWidth > 0)",
        "both published images to load",
    )
    assert loaded
    await no_violations(browser)
    await browser.screenshot("console-profile")


async def test_a_bulk_replay_of_a_filter_replays_every_page_once_however_often_the_form_is_sent(
    browser: Browser, server: TestServer, pool: Pool, start_worker: StartWorker
) -> None:
    users = [f"user-{n:02}" for n in range(PAGE_SIZE + 10)]
    ids = await write_profiles(server, users)
    await kill_pending(pool)
    await start_worker()
    await sign_in(browser, server)
    await browser.open(str(server.make_url("/admin/intents?state=dead")))
    assert await browser.script("return document.getElementById('next-page') !== null"), "more than one page"

    # The same form twice from a script (a double click, a retry), then as people send it.
    await browser.script(
        "const form = document.getElementById('bulk-replay');"
        "const send = () => fetch(form.action, {method: 'POST', body: new URLSearchParams(new FormData(form))});"
        "Promise.all([send(), send()]).then(answers => window.sent = answers.map(a => a.url))"
    )
    sent = await page_shows(browser, "window.sent")
    await browser.script("document.getElementById('bulk-replay-submit').click()")
    await page_shows(browser, "location.pathname.startsWith('/admin/replays/')")
    assert set(sent) == {await browser.script("return location.href")}
    assert await pool.fetchval("SELECT count(*) FROM replay_jobs") == 1

    await page_shows(browser, "document.getElementById('job').dataset.state === 'done'", "the job to finish")
    replayed = await browser.script("return document.getElementById('outcome-replayed').dataset.count")
    assert int(replayed) == len(users)
    assert await browser.script("return document.getElementById('job-processed').textContent") == str(len(users))
    await browser.screenshot("console-replay-job")
    assert await pool.fetchval("SELECT count(*) FROM intents WHERE replays = 1") == len(users)

    async def all_done() -> bool:
        done: int = await pool.fetchval("SELECT count(*) FROM intents WHERE state = 'done'")
        return done == len(ids)

    await until_intents_finish(server.app[SETTINGS].database_url, all_done, what="every replayed intent done")
    await browser.open(str(server.make_url("/admin/")))
    published = await browser.script("return document.getElementById('count-done').dataset.count")
    assert int(published) == len(users)
    await browser.screenshot("console-overview-after-bulk-replay")


async def test_a_forged_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing(
    browser: Browser, server: TestServer, pool: Pool
) -> None:
    (intent_id,) = await write_profiles(server, ["ada"])
    await kill_pending(pool)
    await sign_in(browser, server)
    await browser.open(str(server.make_url(f"/admin/intents/{intent_id}")))
    await browser.script(
        "const url = document.getElementById('replay-one').action;"
        "Promise.all([fetch(url, {method: 'POST'}),"
        " fetch(url, {method: 'POST', body: new URLSearchParams({csrf_token: 'forged'})})])"
        ".then(answers => window.answers = answers.map(a => a.status))"
    )
    assert await page_shows(browser, "window.answers") == [403, 403]
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", intent_id) == "dead"
    await browser.script("document.getElementById('replay-one-submit').click()")
    await page_shows(browser, "document.getElementById('outcome')?.textContent.includes('Replayed')")
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", intent_id) == "pending"


async def test_a_polled_panel_says_it_is_stale_while_the_database_is_down_and_recovers_after(
    browser: Browser, settings: Settings, own_postgres: EmbeddedPostgres
) -> None:
    server = TestServer(create_app(settings.model_copy(update={"database_url": own_postgres.url()})))
    await server.start_server()
    try:
        await browser.open(str(server.make_url("/admin/")))
        await page_shows(browser, "document.getElementById('overview') !== null")
        assert await browser.script("return document.querySelector('.stale-note')") is None
        own_postgres.stop()
        note = await page_shows(browser, "document.querySelector('#overview.stale > .stale-note')?.textContent")
        assert "Not up to date" in note and "503" in note
        own_postgres.start()
        await page_shows(browser, "!document.getElementById('overview').classList.contains('stale')", "fresh again")
        assert await browser.script("return document.querySelector('.stale-note')") is None
    finally:
        await server.close()


# --- without a browser ---------------------------------------------------------------------------


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, html
    return found.group(1)


async def test_in_development_mode_the_console_is_open_says_so_and_reads_without_javascript(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings)
    for user in ("ada", "bob"):
        await accepted(client, user, {"display_name": user}, png(len(user)))
    response = await client.get("/admin/intents?state=pending")
    html = await response.text()
    assert response.status == 200 and 'id="open-banner"' in html
    assert html.count('<tr data-intent="') == 2 and ">ada</a>" in html and ">bob</a>" in html
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [] and " style=" not in html
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie

    dead_end = await client.post("/admin/replays", data={"state": "dead", "job_token": uuid.uuid4().hex})
    assert dead_end.status == 403 and "CSRF" in await dead_end.text()
    assert dead_end.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert (await client.get("/admin")).url.path == "/admin/"


async def test_in_production_without_authentication_the_console_stays_shut(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings.model_copy(update={"mode": "production", "auth_allow_off": True}))
    response = await client.get("/admin/")
    assert response.status == 403 and "The console is off" in await response.text()


async def test_a_session_is_signed_lasts_no_longer_than_its_token_and_is_secure_behind_tls(
    make_client: MakeClient, secured: Settings
) -> None:
    client = await make_client(secured.model_copy(update={"console_behind_tls": True}))
    form = await client.get("/admin/signin")
    anonymous = form.cookies["profiles_console"].value
    short = token("ops-bob", scope=ADMIN_SCOPE, lifetime=120)
    signed = await client.post(
        "/admin/signin",
        data={"token": short, "csrf_token": csrf_of(await form.text()), "next": "/admin/intents"},
        headers={"Cookie": f"profiles_console={anonymous}"},
        allow_redirects=False,
    )
    assert signed.status == 303 and signed.headers["Location"] == "/admin/intents"
    morsel = signed.cookies["profiles_console"]
    assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict"
    assert 0 < int(morsel["max-age"]) <= 120
    session = morsel.value

    def with_cookie(value: str) -> dict[str, str]:
        return {"Cookie": f"profiles_console={value}"}

    inside = await client.get("/admin/intents", headers=with_cookie(session), allow_redirects=False)
    assert inside.status == 200 and "ops-bob" in await inside.text()
    for forged in (session[:-2] + ("AA" if not session.endswith("AA") else "BB"), anonymous, "garbage"):
        outside = await client.get("/admin/intents", headers=with_cookie(forged), allow_redirects=False)
        assert outside.status == 303 and outside.headers["Location"].startswith("/admin/signin"), forged
    polled = await client.get("/admin/", headers={**with_cookie(anonymous), "HX-Request": "true"})
    assert polled.headers["HX-Redirect"] == "/admin/signin?next=/admin/"
    elsewhere = await client.post(
        "/admin/signin",
        data={"token": OPERATOR, "csrf_token": csrf_of(await form.text()), "next": "//evil.example/"},
        headers=with_cookie(anonymous),
        allow_redirects=False,
    )
    assert elsewhere.headers["Location"] == "/admin/"


async def test_a_bulk_replay_reports_each_intent_it_could_not_replay_and_still_finishes(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    client = await make_client(settings)
    ids = [
        uuid.UUID((await accepted(client, u, {"display_name": u}, png(n)))["intent_id"]) for n, u in enumerate("abc")
    ]
    await kill_pending(pool)
    job_id = await operations.submit_replay_job(pool, "t" * 32, IntentFilter(state=Replayable.DEAD), "ops")
    assert await operations.submit_replay_job(pool, "t" * 32, IntentFilter(state=Replayable.DEAD), "ops") == job_id
    # A worker starts the job (it lists the three) and vanishes at once (its lease ends now) ...
    job = await repository.claim_replay_job(pool, "vanished", 0)
    assert job is not None and await repository.start_replay_job(
        pool, job, await operations.replayable_ids(pool, job.filter)
    )
    # ... an operator replays one of them by hand meanwhile, and it is published ...
    assert await operations.replay(pool, settings, ids[1]) is ReplayOutcome.REPLAYED
    await publish_due(settings)
    # ... and another worker carries the job on.
    assert await operations.run_next_replay_job(pool, settings, "next")
    report = await operations.job_report(pool, job_id)
    assert report is not None and report.job.state is JobState.DONE and report.job.processed == 3
    assert report.outcomes == {ReplayOutcome.REPLAYED: 2, ReplayOutcome.FINISHED: 1}
    assert [(c.intent_id, c.outcome, c.state) for c in report.refused] == [(ids[1], "finished", "done")]
    page = await (await client.get(f"/admin/replays/{job_id}")).text()
    assert f'<tr class="conflict" data-intent="{ids[1]}">' in page and "finished" in page

    await pool.execute("UPDATE replay_jobs SET finished_at = now() - interval '8 days'")
    assert (await prune(settings, pool))["replay_jobs"] == 1
    assert await pool.fetchval("SELECT count(*) FROM replay_job_intents") == 0


async def test_a_replay_job_holder_that_lost_its_lease_replays_nothing_more(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    client = await make_client(settings)
    (intent,) = [uuid.UUID((await accepted(client, "ada", {"display_name": "Ada"}, png(1)))["intent_id"])]
    await kill_pending(pool)
    await operations.submit_replay_job(pool, "u" * 32, IntentFilter(state=Replayable.DEAD), "ops")
    stale = await repository.claim_replay_job(pool, "stale", 0)
    assert stale is not None and await repository.start_replay_job(pool, stale, [intent])
    assert await repository.claim_replay_job(pool, "new holder", 60) is not None
    with pytest.raises(operations._LeaseLost):
        await operations._replay_for_job(pool, settings, stale, intent)
    assert await pool.fetchval("SELECT state FROM intents WHERE id = $1", intent) == "dead"
    assert await pool.fetchval("SELECT outcome FROM replay_job_intents") is None


async def test_the_overview_shows_the_last_reconciliation_and_what_it_found(
    make_client: MakeClient, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    client = await make_client(settings)
    stray = f"{settings.s3_key_prefix}{uuid.uuid4().hex}"
    await blobs.put_once(stray, b"x", hashlib.sha256(b"x").hexdigest(), "image/png")
    before = await (await client.get("/admin/")).text()
    assert "Not run yet" in before
    await reconcile(settings, pool, blobs)
    after = await (await client.get("/admin/")).text()
    findings = re.search(r'id="reconcile-findings">([^<]*)<', after)
    assert findings is not None and findings.group(1).strip() == "1 stray"


async def test_the_vendored_htmx_is_the_published_file_with_its_licence_served_from_the_console(
    make_client: MakeClient, settings: Settings
) -> None:
    assert hashlib.sha256((HTMX / "htmx.min.js").read_bytes()).hexdigest() == HTMX_SHA256
    assert HTMX_SHA256 in (HTMX / "SOURCE.md").read_text(encoding="utf-8")
    assert "Zero-Clause BSD" in (HTMX / "LICENSE").read_text(encoding="utf-8")
    client = await make_client(settings)
    served = await client.get("/admin/static/vendor/htmx/htmx.min.js")
    assert served.status == 200 and hashlib.sha256(await served.read()).hexdigest() == HTMX_SHA256


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"profiles_console={value}"}


async def post_sign_in(
    http: aiohttp.ClientSession, client: Client, access_token: str = OPERATOR, target: str = "/admin/"
) -> aiohttp.ClientResponse:
    """The sign-in form, then its POST with the form's session and CSRF token (not followed)."""
    async with http.get(client.make_url("/admin/signin")) as form:
        anonymous, html = form.cookies["profiles_console"].value, await form.text()
    data = {"token": access_token, "csrf_token": csrf_of(html), "next": target}
    return await http.post(
        client.make_url("/admin/signin"), data=data, headers=cookie(anonymous), allow_redirects=False
    )


async def session_of(http: aiohttp.ClientSession, client: Client) -> str:
    signed = await post_sign_in(http, client)
    assert signed.status == 303, await signed.text()
    return signed.cookies["profiles_console"].value


async def test_a_session_cookie_is_worthless_once_its_owner_signed_out_and_ended_sessions_are_pruned(
    make_client: MakeClient, secured: Settings, http: aiohttp.ClientSession, pool: Pool
) -> None:
    client = await make_client(secured)
    session, other = await session_of(http, client), await session_of(http, client)
    async with http.get(client.make_url("/admin/"), headers=cookie(session)) as inside:
        html = await inside.text()
        assert inside.status == 200 and "ops-alice" in html
    signed_out = await http.post(
        client.make_url("/admin/signout"),
        data={"csrf_token": csrf_of(html)},
        headers=cookie(session),
        allow_redirects=False,
    )
    assert signed_out.status == 303 and signed_out.headers["Location"] == "/admin/signin"

    # Someone who copied the cookie (a shared machine, a proxy log) replays it after the sign-out.
    replayed = await http.get(client.make_url("/admin/intents"), headers=cookie(session), allow_redirects=False)
    assert replayed.status == 303 and replayed.headers["Location"].startswith("/admin/signin"), (
        "the signed-out session still opens the console"
    )
    assert (await http.get(client.make_url("/admin/"), headers=cookie(other), allow_redirects=False)).status == 200
    assert await pool.fetchval("SELECT count(*) FROM console_sessions") == 1
    await pool.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
    assert (await prune(secured, pool))["console_sessions"] == 1
    assert await pool.fetchval("SELECT count(*) FROM console_sessions") == 0


async def test_an_admin_token_with_a_far_future_expiry_is_not_an_internal_error(
    make_client: MakeClient, secured: Settings, http: aiohttp.ClientSession
) -> None:
    # A valid signature and a huge (but integral) exp: PyJWT accepts it, and so did the API before
    # Identity.expires_at = float(claims["exp"]).
    far = token("ops-dave", scope=ADMIN_SCOPE, exp=10**400)
    client = await make_client(secured)
    listed = await client.get("/v1/admin/intents", headers={"Authorization": f"Bearer {far}"})
    assert listed.status == 200, await listed.text()
    write = await client.put(
        "/v1/profiles/ops-dave",
        data=None,
        headers={"Authorization": f"Bearer {far}", "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert write.status < 500, await write.text()
    signed = await post_sign_in(http, client, far)
    assert signed.status == 303, await signed.text()


async def test_a_line_break_in_the_next_target_falls_back_to_the_overview_after_signing_in(
    make_client: MakeClient, secured: Settings, http: aiohttp.ClientSession
) -> None:
    client = await make_client(secured)
    for target in ("/admin/\r\nSet-Cookie: planted=1", "/admin/\x00", "/admin/\tx", "/admin/\x7f"):
        signed = await post_sign_in(http, client, target=target)
        assert signed.status == 303, f"{signed.status}: {await signed.text()}"
        assert signed.headers["Location"] == "/admin/", target
        assert "planted" not in signed.headers.get("Set-Cookie", "")


async def test_a_token_accepted_within_the_clock_leeway_but_expired_is_refused_with_a_message(
    make_client: MakeClient, secured: Settings, http: aiohttp.ClientSession, pool: Pool
) -> None:
    # Expired 10 s ago, inside the default 30 s leeway: the verifier accepts it, but a session on it
    # would end before it began.
    client = await make_client(secured)
    just_expired = token("ops-erin", scope=ADMIN_SCOPE, exp=int(time.time()) - 10)
    signed = await post_sign_in(http, client, just_expired)
    assert signed.status == 401 and "that token has expired" in await signed.text()
    assert await pool.fetchval("SELECT count(*) FROM console_sessions") == 0


async def test_a_bulk_replay_form_sent_again_with_another_filter_is_refused_with_a_page(
    make_client: MakeClient, settings: Settings, pool: Pool
) -> None:
    client = await make_client(settings)
    html = await (await client.get("/admin/intents?state=dead")).text()
    job_token = re.search(r'name="job_token" value="([0-9a-f]{32})"', html)
    assert job_token is not None, html
    form = {"csrf_token": csrf_of(html), "job_token": job_token.group(1), "state": "dead"}
    first = await client.post("/admin/replays", data=form, allow_redirects=False)
    assert first.status == 303 and first.headers["Location"].startswith("/admin/replays/")
    again = await client.post("/admin/replays", data=form, allow_redirects=False)
    assert again.headers.get("Location") == first.headers["Location"]

    other = await client.post("/admin/replays", data={**form, "user_id": "ada"}, allow_redirects=False)
    assert other.status == 422 and other.content_type == "text/html"
    assert "already asked for replay job" in await other.text()
    with pytest.raises(JobTokenReused):
        await operations.submit_replay_job(pool, job_token.group(1), IntentFilter(state=Replayable.STUCK), "ops")
    assert await pool.fetchval("SELECT count(*) FROM replay_jobs") == 1


async def test_with_postgres_down_every_console_page_and_poll_is_a_503_page_with_retry_after(
    make_client: MakeClient, settings: Settings, own_postgres: EmbeddedPostgres
) -> None:
    client = await make_client(settings.model_copy(update={"database_url": own_postgres.url()}))
    assert (await client.get("/admin/")).status == 200
    own_postgres.stop()
    for path in ("/admin/", "/admin/intents?state=dead", "/admin/profiles/ada"):
        for headers in ({}, {"HX-Request": "true"}):
            response = await client.get(path, headers=headers)
            text = await response.text()
            assert response.status == 503 and response.content_type == "text/html", (path, text)
            assert "Traceback" not in text and "Unavailable" in text
            assert response.headers.get("Retry-After") == str(settings.retry_after_seconds), path


async def test_in_production_without_a_console_secret_the_console_stays_shut_and_says_why(
    make_client: MakeClient, secured: Settings
) -> None:
    client = await make_client(secured.model_copy(update={"console_secret": None}))
    for path in ("/admin/", "/admin/signin"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 403 and "PROFILES_CONSOLE_SECRET is not set" in await response.text(), path
    assert (await client.get("/v1/admin/intents", headers=bearer("ops", scope=ADMIN_SCOPE))).status == 200

"""Who may use the console and how its requests are protected: the access mode, signed session
cookies (itsdangerous) naming sessions kept in the database, a CSRF token on every state-changing
request, security headers."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer

from service.api.auth import Identity
from service.core import repository
from service.core.repository import Pool
from service.core.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "profiles_console"
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# No inline script or style anywhere: scripts and styles come from /admin/static/ only.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)


class Access(StrEnum):
    """How the console is reached, decided by the settings."""

    # Development mode with authentication off: no sign-in, and every page says so.
    OPEN = "open"
    # Authentication on: an admin token signs in.
    SIGN_IN = "sign_in"
    # Production with authentication off (a gateway checks bearer tokens): nobody can be checked
    # here, so the console stays shut.
    OFF = "off"
    # Production with authentication on but no PROFILES_CONSOLE_SECRET: each replica would sign
    # sessions and sign-in forms with a key of its own, so the console stays shut until it is set
    # (the API itself serves on; the console is not worth refusing to start for).
    NO_SECRET = "no_secret"

    @classmethod
    def of(cls, settings: Settings) -> Access:
        if not settings.auth_enabled:
            return cls.OPEN if settings.mode == "development" else cls.OFF
        if settings.mode == "production" and settings.console_secret is None:
            return cls.NO_SECRET
        return cls.SIGN_IN


class CsrfRefused(Exception):
    """A state-changing request without the CSRF token of its session."""


@dataclass(frozen=True)
class Session:
    """A visitor's session: the CSRF token of the forms, who signed in (None: nobody yet) and until
    when. An anonymous one lives in its cookie alone; a signed-in one is a row of console_sessions
    named by the random `id` its cookie carries, so that signing out ends it everywhere."""

    csrf: str
    subject: str | None
    expires_at: float
    id: str | None = None

    @classmethod
    def anonymous(cls, lifetime: float) -> Session:
        return cls(secrets.token_urlsafe(32), None, time.time() + lifetime)


def _digest(session_id: str) -> bytes:
    # Only the hash is stored: a copy of the table opens no session.
    return hashlib.sha256(session_id.encode()).digest()


class Sessions:
    """Signs and checks session cookies (HMAC-SHA256 with a timestamp, itsdangerous), and keeps
    signed-in sessions in the database."""

    def __init__(self, settings: Settings) -> None:
        secret = (
            settings.console_secret.get_secret_value()
            if settings.console_secret is not None
            else secrets.token_urlsafe(32)
        )
        self._serializer = URLSafeTimedSerializer(
            secret, salt="profiles-console-session", signer_kwargs={"digest_method": hashlib.sha256}
        )
        self.lifetime = settings.console_session_seconds
        self._behind_tls = settings.console_behind_tls

    async def load(self, pool: Pool, cookie: str | None) -> Session | None:
        """The session of a cookie this console signed, if it has neither ended nor expired; else None."""
        if not cookie:
            return None
        try:
            data: Any = self._serializer.loads(cookie, max_age=int(self.lifetime))
            if "sid" in data:
                return await self._signed_in(pool, str(data["sid"]))
            session = Session(str(data["csrf"]), None, float(data["expires_at"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        return session if session.expires_at > time.time() else None

    async def _signed_in(self, pool: Pool, session_id: str) -> Session | None:
        row = await repository.get_console_session(pool, _digest(session_id))
        return None if row is None else Session(row.csrf, row.subject, row.expires_at, session_id)

    async def sign_in(self, pool: Pool, identity: Identity) -> Session:
        """A new signed-in session, ending after the lifetime or with the admin token, whichever is
        sooner; a fresh CSRF token too, so nothing learnt before signing in is of use after."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires_at = await repository.start_console_session(
            pool, _digest(session_id), identity.subject, csrf, self.lifetime, identity.expires_at
        )
        return Session(csrf, identity.subject, expires_at, session_id)

    async def end(self, pool: Pool, session: Session) -> None:
        if session.id is not None:
            await repository.end_console_session(pool, _digest(session.id))

    def dump(self, session: Session) -> str:
        if session.id is not None:
            return self._serializer.dumps({"sid": session.id})
        return self._serializer.dumps({"csrf": session.csrf, "expires_at": session.expires_at})

    def set_cookie(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.dump(session),
            max_age=max(1, int(session.expires_at - time.time())),
            path=COOKIE_PATH,
            httponly=True,
            samesite="Strict",
            secure=request.secure or self._behind_tls,
        )


async def check_csrf(request: web.Request, session: Session) -> None:
    """Refuse a state-changing request unless its form carries its session's CSRF token: a forged
    form on another site has no way to read it."""
    given = (await request.post()).get(CSRF_FIELD)
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise CsrfRefused


def secure_headers(headers: MutableMapping[str, str], *, cacheable: bool) -> None:
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"
    if not cacheable:
        headers["Cache-Control"] = "no-store"


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of the console, errors and redirects included, carries the headers; pages are never cached."""
    cacheable = request.match_info.route.name == "static"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        secure_headers(exc.headers, cacheable=False)
        raise
    secure_headers(response.headers, cacheable=cacheable)
    return response

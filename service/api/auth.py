"""Who is calling and what they may do: bearer JWTs verified with PyJWT (an HS256 secret or keys
from a JWKS URL), and the rules: a profile is written by its owner or an admin, operator routes
need the admin scope, reads are public unless configured otherwise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jwt

from service.api.jwks import JwksCache, UnknownKey
from service.core.settings import Settings

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 8 * 1024
# A later exp counts as this one (9999-12-31T23:59:59Z).
LATEST_EXPIRY = 253_402_300_799


class AuthNotConfigured(Exception):
    """Production settings without authentication, and nobody said a gateway does it."""


class MissingToken(Exception):
    """The request carries no bearer token where one is needed."""


class InvalidToken(Exception):
    """The token is malformed, expired, not ours, or its signature does not verify."""


class NotAllowed(Exception):
    """A valid token whose subject or scopes do not allow this request."""

    def __init__(self, detail: str, scope: str | None = None) -> None:
        super().__init__(detail)
        self.scope = scope


@dataclass(frozen=True)
class Identity:
    subject: str
    scopes: frozenset[str]
    # The token's exp (seconds since the epoch).
    expires_at: float


def check_configuration(settings: Settings) -> None:
    """Refuse to serve production traffic with authentication off unless that was asked for."""
    if settings.auth_enabled:
        return
    if settings.mode == "production" and not settings.auth_allow_off:
        raise AuthNotConfigured(
            "refusing to start with authentication off: set PROFILES_AUTH_JWT_SECRET or PROFILES_AUTH_JWKS_URL, or set "
            "PROFILES_AUTH_ALLOW_OFF=true if a gateway in front of the API authenticates every request"
        )
    log.warning("authentication is OFF (%s mode): anyone can write any profile and use the admin routes", settings.mode)


class Authenticator:
    """Verifies bearer tokens and applies the access rules; with auth off every request is allowed."""

    def __init__(self, settings: Settings, keys: JwksCache | None = None) -> None:
        self._settings = settings
        self._keys = keys

    async def allow_write(self, authorization: str | None, user_id: str) -> None:
        identity = await self._required(authorization)
        if identity is not None and identity.subject != user_id and not self._is_admin(identity):
            raise NotAllowed("a profile can only be changed by its owner (the token's sub) or an admin")

    async def allow_admin(self, authorization: str | None) -> None:
        identity = await self._required(authorization)
        if identity is not None:
            self._check_admin(identity)

    async def verify_admin(self, token: str) -> Identity:
        """Who an admin token belongs to, verified as bearer tokens are (the console's sign-in)."""
        identity = _identity(await self._claims(token.strip()))
        self._check_admin(identity)
        return identity

    def _check_admin(self, identity: Identity) -> None:
        if not self._is_admin(identity):
            scope = self._settings.auth_admin_scope
            raise NotAllowed(f"the admin scope {scope!r} is required", scope=scope)

    async def allow_read(self, authorization: str | None) -> None:
        if self._settings.auth_reads_require_token:
            await self._required(authorization)

    def _is_admin(self, identity: Identity) -> bool:
        return self._settings.auth_admin_scope in identity.scopes

    async def _required(self, authorization: str | None) -> Identity | None:
        if not self._settings.auth_enabled:
            return None
        if not authorization:
            raise MissingToken("a bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("the Authorization header must be 'Bearer <token>'")
        return _identity(await self._claims(token.strip()))

    async def _claims(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("the token is too long")
        settings = self._settings
        try:
            key, algorithms = await self._key_for(token)
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=settings.auth_audience,
                issuer=settings.auth_issuer,
                leeway=settings.auth_leeway_seconds,
                options={"require": ["exp", "sub"], "verify_aud": settings.auth_audience is not None},
            )
        except (jwt.PyJWTError, UnknownKey) as exc:
            raise InvalidToken(str(exc) or exc.__class__.__name__) from None

    async def _key_for(self, token: str) -> tuple[Any, list[str]]:
        if self._keys is None:
            assert self._settings.auth_jwt_secret is not None
            return self._settings.auth_jwt_secret.get_secret_value(), ["HS256"]
        key_id = jwt.get_unverified_header(token).get("kid")
        if key_id is not None and not isinstance(key_id, str):
            raise InvalidToken("the token's kid must be a string")
        key = await self._keys.key(key_id)
        return key.key, [key.algorithm_name]


def _identity(claims: dict[str, Any]) -> Identity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("the token's sub must be a non-empty string")
    # PyJWT checked that int(exp) works; clamped, since a huge integer (10**400) overflows a float.
    return Identity(subject, _scopes(claims), float(min(int(claims["exp"]), LATEST_EXPIRY)))


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    # OAuth 2.0 access tokens carry "scope" as a space-separated string (RFC 8693, RFC 9068); some
    # issuers (Azure AD, Okta) use "scp", as a string or a list.
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str))
    return frozenset(found)

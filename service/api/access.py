"""Access checks of the HTTP layer: who may call a route (the auth rules) and how often (write
rate limits). Handlers call these before they read a request body."""

from __future__ import annotations

from aiohttp import web

from service.api.auth import MissingToken, NotAllowed
from service.api.problems import Problem
from service.api.ratelimit import client_address
from service.api.state import AUTH, LIMITS, SETTINGS


async def check_write(request: web.Request, user_id: str) -> None:
    await request.app[AUTH].allow_write(request.headers.get("Authorization"), user_id)
    limits = request.app[LIMITS]
    forwarded = request.headers.get("X-Forwarded-For")
    limits.per_address.take(client_address(request.remote, forwarded, request.app[SETTINGS].trusted_proxy_hops))
    limits.per_user.take(user_id)


async def check_read(request: web.Request) -> None:
    await request.app[AUTH].allow_read(request.headers.get("Authorization"))


async def check_admin(request: web.Request) -> None:
    await request.app[AUTH].allow_admin(request.headers.get("Authorization"))


async def check_original(request: web.Request) -> None:
    """Original images (their bytes) are public unless PROFILES_PUBLIC_ORIGINALS is false: then only
    the admin scope reads them (with authentication off, as every admin route, anyone). A token
    that does not verify is still a 401."""
    if request.app[SETTINGS].public_originals:
        return
    try:
        await check_admin(request)
    except (MissingToken, NotAllowed):
        raise Problem(
            403,
            "Original not public",
            "this service publishes only the variants of images (?variant=<name>); originals need the admin scope",
            slug="original-not-public",
        ) from None

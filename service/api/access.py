"""Access checks of the HTTP layer: who may call a route (the auth rules) and how often (write
rate limits). Handlers call these before they read a request body."""

from __future__ import annotations

from aiohttp import web

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

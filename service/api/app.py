"""The aiohttp application factory: typed app state, resources in cleanup_ctx, error middleware."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from service.api import admin, handlers
from service.api.auth import Authenticator, InvalidToken, MissingToken, NotAllowed, check_configuration
from service.api.budget import BudgetExceeded, UploadBudget
from service.api.console import add_console
from service.api.jwks import JwksCache, KeysUnavailable
from service.api.problems import Problem, forbidden, not_found, unauthenticated, unavailable
from service.api.ratelimit import RateLimited, WriteLimits
from service.api.state import AUTH, BLOBS, BUDGET, IMAGES, LIMITS, POOL, SETTINGS, WAITER
from service.core import metrics, repository
from service.core.blobstore import open_blob_store
from service.core.imagecache import ImageCache
from service.core.logs import REQUEST_ID
from service.core.notifications import FinishWaiter
from service.core.profiles import (
    BlobUnavailable,
    IdempotencyInFlight,
    IdempotencyMismatch,
    PreconditionFailed,
    ProfileNotFound,
    VariantNotMade,
)
from service.core.repository import DATABASE_UNAVAILABLE
from service.core.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_FORMAT = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _problem_for(exc: Exception, retry_after: int) -> Problem | None:
    match exc:
        case Problem():
            return exc
        case ProfileNotFound():
            return not_found("no such profile or version")
        case VariantNotMade():
            return Problem(404, "Variant not yet made", str(exc), slug="variant-not-made")
        case PreconditionFailed():
            return Problem(412, "Precondition failed", str(exc))
        case IdempotencyInFlight():
            return Problem(
                409,
                "Request in progress",
                "a request with this Idempotency-Key is still being handled; retry later",
                slug="idempotency-in-flight",
                headers={"Retry-After": "1"},
            )
        case IdempotencyMismatch():
            return Problem(
                422,
                "Idempotency-Key reused",
                "this Idempotency-Key was used with a different request body",
                slug="idempotency-key-reused",
            )
        case MissingToken():
            return unauthenticated(str(exc), invalid=False)
        case InvalidToken():
            return unauthenticated(str(exc), invalid=True)
        case NotAllowed():
            return forbidden(str(exc), exc.scope)
        case RateLimited():
            return Problem(429, "Too many requests", str(exc), headers={"Retry-After": str(exc.retry_after)})
        case KeysUnavailable():
            return unavailable("the token issuer's key set", retry_after)
        case BudgetExceeded():
            return unavailable("upload capacity (too many uploads in flight)", retry_after)
        case BlobUnavailable():
            return unavailable("the blob store", retry_after)
        case TimeoutError():
            return unavailable("a dependency did not answer in time; the service", retry_after)
        case _ if isinstance(exc, DATABASE_UNAVAILABLE):
            return unavailable("the database", retry_after)
    return None


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request has an id: the caller's X-Request-ID if it is sane, else a new one; it is
    echoed back and attached to every log line written while handling the request."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if REQUEST_ID_FORMAT.fullmatch(given) else uuid.uuid4().hex
    token = REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    finally:
        REQUEST_ID.reset(token)
    response.headers["X-Request-ID"] = request_id
    return response


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as problem+json; a request never outlives its deadline."""
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(settings.request_timeout_seconds):
            return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {name: value for name, value in exc.headers.items() if name in {"Allow", "WWW-Authenticate"}}
        return Problem(exc.status, exc.reason, exc.text or exc.reason, headers=kept).response()
    except Exception as exc:
        problem = _problem_for(exc, settings.retry_after_seconds)
        if problem is None:
            log.exception("%s %s failed", request.method, request.path)
            problem = Problem(500, "Internal error", "the request failed unexpectedly; it has been logged")
        elif problem.status >= 500:
            log.warning("%s %s answered %s: %r", request.method, request.path, problem.status, exc)
        return problem.response()


def _resources(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        pool = await repository.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=settings.db_acquire_timeout_seconds,
        )
        waiter = FinishWaiter(settings.database_url, settings.poll_interval_seconds)
        async with open_blob_store(settings) as blobs:
            app[POOL], app[BLOBS], app[WAITER] = pool, blobs, waiter
            try:
                yield
            finally:
                await waiter.listener.close()
                await pool.close()

    return resources


def _authentication(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def authentication(app: web.Application) -> AsyncIterator[None]:
        if settings.auth_jwks_url is None:
            app[AUTH] = Authenticator(settings)
            yield
            return
        async with aiohttp.ClientSession() as session:
            keys = JwksCache(
                session,
                settings.auth_jwks_url,
                settings.auth_jwks_cache_seconds,
                settings.auth_jwks_min_refresh_seconds,
            )
            app[AUTH] = Authenticator(settings, keys)
            yield

    return authentication


def create_app(settings: Settings) -> web.Application:
    """The API application; raises AuthNotConfigured for production settings without authentication."""
    check_configuration(settings)
    app = web.Application(middlewares=[request_ids, metrics.http_metrics, problems])
    app[SETTINGS] = settings
    app[BUDGET] = UploadBudget(settings.max_inflight_upload_bytes)
    app[IMAGES] = ImageCache(settings.image_cache_bytes, read_timeout=settings.request_timeout_seconds)
    app[LIMITS] = WriteLimits.of(
        settings.write_rate_per_user_per_minute,
        settings.write_burst_per_user,
        settings.write_rate_per_ip_per_minute,
        settings.write_burst_per_ip,
    )
    app.cleanup_ctx.extend([_resources(settings), _authentication(settings)])
    handlers.add_routes(app)
    app.router.add_get("/metrics", metrics.metrics_handler(lambda: app[POOL], settings.gc_grace_seconds))
    admin.add_routes(app)
    add_console(app, settings)
    return app


async def serve(
    settings: Settings, host: str, port: int, stop: asyncio.Event, listening: asyncio.Event | None = None
) -> None:
    """Serve the API until `stop` is set, then finish in-flight requests and close resources;
    `listening` is set once the port accepts connections."""
    # An access line per request costs a fifth of a read's CPU; metrics count every request anyway.
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        # aiohttp closes a connection whose request headers are not complete by then (slow loris).
        keepalive_timeout=settings.idle_connection_seconds,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("API listening on http://%s:%d", host, port)
        if listening is not None:
            listening.set()
        await stop.wait()
    finally:
        await runner.cleanup()

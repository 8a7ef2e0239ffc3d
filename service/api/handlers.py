"""HTTP handlers: parse and validate the request, call the profile rules, shape the response."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from service.api import access, delivery, openapi
from service.api.budget import Reservation
from service.api.multipart import Upload, read_upload
from service.api.problems import Problem, not_found, validation_errors
from service.api.schemas import AcceptedOut, IntentOut, ProfileOut
from service.api.state import BLOBS, BUDGET, IMAGES, POOL, SETTINGS, WAITER
from service.core import profiles
from service.core.domain import MAX_IDEMPOTENCY_KEY_LENGTH, USER_ID_RULE, Metadata, is_valid_user_id
from service.core.images import INLINE_CHECK_BYTES, ImageInfo, ImageRejected, decode, read_header
from service.core.profiles import Preconditions, PutRequest
from service.core.repository import DATABASE_UNAVAILABLE, Accepted, PublishedVersion, StoredImage

MAX_PREFER_WAIT_SECONDS = 30
# A version's bytes never change, but the URL stops answering: at once when the profile is deleted,
# and once its blob is collected (at least the grace period after it stopped being live). So caches
# may keep it only briefly, without revalidating meanwhile (immutable); after that its ETag makes
# revalidation a cheap 304 while it still exists. Shared caches only when reads need no token.
VERSION_IMAGE_MAX_AGE = "max-age=60, immutable"
READY_CHECK_SECONDS = 2.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_VERSION_TAG = re.compile(r'^"([0-9]{1,18})"$')
_VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,17}")


def _user_id(request: web.Request) -> str:
    user_id = request.match_info["user_id"]
    if not is_valid_user_id(user_id):
        raise Problem(400, "Invalid user id", USER_ID_RULE, slug="invalid-user-id")
    return user_id


def _preconditions(request: web.Request) -> Preconditions:
    if_match = request.headers.get("If-Match")
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise Problem(
            400, "Invalid precondition", 'on writes If-None-Match can only be "*"', slug="invalid-precondition"
        )
    expected: int | None = None
    if if_match is not None:
        match = _VERSION_TAG.match(if_match.strip())
        if match is None:
            raise Problem(
                400, "Invalid precondition", 'If-Match must be a quoted version, like "3"', slug="invalid-precondition"
            )
        expected = int(match.group(1))
    return Preconditions(if_match=expected, if_none_match_any=if_none_match is not None)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise Problem(
            400,
            "Invalid Idempotency-Key",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
            slug="invalid-idempotency-key",
        )
    return key


def _prefer_wait(request: web.Request) -> int | None:
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    return None if match is None else min(int(match.group(1)), MAX_PREFER_WAIT_SECONDS)


def _metadata(raw: bytes) -> Metadata:
    try:
        document = json.loads(raw)
    except ValueError:
        raise Problem(400, "Malformed body", "the metadata part is not valid JSON", slug="malformed-body") from None
    if not isinstance(document, dict):
        raise Problem(400, "Malformed body", "the metadata part must be a JSON object", slug="malformed-body")
    try:
        return Metadata.model_validate(document)
    except ValidationError as exc:
        raise Problem(
            422,
            "Invalid metadata",
            "the metadata does not follow the schema",
            slug="invalid-metadata",
            errors=validation_errors(exc),
        ) from None


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def _not_modified(etag: str, cache: str | None = None) -> web.Response:
    headers = {"ETag": etag} if cache is None else {"ETag": etag, "Cache-Control": cache}
    return web.Response(status=304, headers=headers)


async def put_profile(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    user_id = _user_id(request)
    await access.check_write(request, user_id)
    preconditions = _preconditions(request)
    key = _idempotency_key(request)
    wait = _prefer_wait(request)
    with request.app[BUDGET].reservation() as held:
        upload = await read_upload(request, settings.max_image_bytes, held, settings.body_deadline_seconds)
        image = await _checked_image(upload.image, settings.max_image_side, held)
        return await _accept(request, user_id, upload, image, preconditions, key, wait)


async def _checked_image(data: bytes, max_side: int, held: Reservation) -> ImageInfo:
    """Identify and bound the image, charge the memory its check decodes into, then prove that it
    decodes: in a thread, unless the image is small enough for its check to cost less than the hops."""
    try:
        small = len(data) <= INLINE_CHECK_BYTES
        header = read_header(data, max_side) if small else await held.in_thread(read_header, data, max_side)
        held.take(header.decode_bytes)
        if small and header.decodes_inline:
            return decode(data, header)
        return await held.in_thread(decode, data, header)
    except ImageRejected as exc:
        raise Problem(exc.status, exc.title, exc.detail) from None


async def _accept(
    request: web.Request,
    user_id: str,
    upload: Upload,
    image: ImageInfo,
    preconditions: Preconditions,
    key: str | None,
    wait: int | None,
) -> web.Response:
    settings = request.app[SETTINGS]
    metadata = _metadata(upload.metadata)
    put = PutRequest(
        user_id=user_id,
        metadata=metadata,
        image=image,
        data=upload.image,
        preconditions=preconditions,
        idempotency_key=key,
    )
    accepted = await profiles.accept_put(request.app[POOL], settings, put)
    if wait:
        live = await _wait_until_live(request, accepted, min(wait, settings.request_timeout_seconds / 2))
        if live is not None:
            return web.json_response(
                ProfileOut.body(live, _served(request)),
                status=200,
                headers={"ETag": f'"{live.version}"', "Preference-Applied": f"wait={wait}"},
            )
    body = AcceptedOut.of(accepted)
    return web.json_response(body.model_dump(mode="json"), status=202, headers={"Location": body.status_url})


async def _wait_until_live(request: web.Request, accepted: Accepted, timeout: float) -> PublishedVersion | None:
    """The accepted version if it went live within `timeout`. The write is already committed, so a
    database hiccup while waiting must not turn its 202 into an error: it only ends the wait."""
    pool = request.app[POOL]
    try:
        finished = await request.app[WAITER].wait(
            str(accepted.intent_id), timeout, lambda: profiles.intent_finished(pool, accepted.intent_id)
        )
        return await profiles.live_if_accepted(pool, accepted) if finished else None
    except DATABASE_UNAVAILABLE:
        return None


async def get_profile(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    await access.check_read(request)
    embed = request.query.get("embed")
    if embed not in (None, "image"):
        raise Problem(400, "Invalid query", "embed can only be 'image'", slug="invalid-query")
    pool = request.app[POOL]
    if embed:
        await access.check_original(request)
    version = await profiles.live_version(pool, user_id)
    data: bytes | None = None
    if embed:
        version, _, data = await profiles.read_live_image(pool, request.app[BLOBS], request.app[IMAGES], version)
    etag = f'"{version.version}"'
    if _etag_matches(request.headers.get("If-None-Match"), etag):
        return _not_modified(etag)
    return web.json_response(ProfileOut.body(version, _served(request), data), headers={"ETag": etag})


def _served(request: web.Request) -> frozenset[str]:
    """The variants served: those configured now (one removed from the configuration is not)."""
    return frozenset(spec.name for spec in request.app[SETTINGS].variants)


async def _variant(request: web.Request) -> str | None:
    """The ?variant= asked for: None for the original image (if the caller may read originals); a
    name that is not configured is a 400 that lists the names."""
    name = request.query.get("variant")
    if name is None:
        await access.check_original(request)
        return None
    if name not in _served(request):
        names = [spec.name for spec in request.app[SETTINGS].variants]
        known = ", ".join(names) or "none is configured"
        raise Problem(
            400,
            "Unknown variant",
            f"variant {name!r} is not one of: {known}",
            slug="unknown-variant",
            errors=[{"field": "variant", "message": f"one of: {known}"}],
        )
    return name


def _image_etag(request: web.Request, image: StoredImage, cache: str) -> tuple[str, web.Response | None]:
    """An image's ETag (from its sha256), and the 304 to answer if the caller already holds it."""
    etag = f'"{image.sha256}"'
    return etag, _not_modified(etag, cache) if _etag_matches(request.headers.get("If-None-Match"), etag) else None


def _image_response(request: web.Request, image: StoredImage, data: bytes | None, cache: str) -> web.Response:
    etag, unchanged = _image_etag(request, image, cache)
    if unchanged is not None:
        return unchanged
    headers = {"ETag": etag, "Cache-Control": cache, "Content-Type": image.content_type}
    if data is None:  # HEAD: the headers come from the database alone
        headers["Content-Length"] = str(image.size)
    return web.Response(body=data, headers=headers)


async def _redirect(request: web.Request, image: StoredImage, cache: str) -> web.Response:
    """Redirect delivery: the same ETag and 304 as the bytes would have, else a redirect to them."""
    etag, unchanged = _image_etag(request, image, cache)
    if unchanged is not None:
        return unchanged
    return await delivery.redirect(
        request.app[SETTINGS], request.app[BLOBS], image, head=request.method == "HEAD", etag=etag
    )


async def get_live_image(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    await access.check_read(request)
    variant = await _variant(request)
    pool = request.app[POOL]
    live = await profiles.live_version(pool, user_id)
    image = profiles.image_of(live, variant)
    if delivery.redirects(request.app[SETTINGS]):
        return await _redirect(request, image, "no-cache")
    # A caller that holds these bytes already, and HEAD, are answered from the database alone.
    _, unchanged = _image_etag(request, image, "no-cache")
    if unchanged is not None:
        return unchanged
    if request.method == "HEAD":
        return _image_response(request, image, None, "no-cache")
    _, image, data = await profiles.read_live_image(pool, request.app[BLOBS], request.app[IMAGES], live, variant)
    return _image_response(request, image, data, "no-cache")


async def get_version_image(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    await access.check_read(request)
    variant = await _variant(request)
    number = request.match_info["version"]
    if _VERSION_NUMBER.fullmatch(number) is None:
        raise not_found("versions are positive integers")
    pool, blobs = request.app[POOL], request.app[BLOBS]
    audience = "private" if request.app[SETTINGS].auth_reads_require_token else "public"
    cache = f"{audience}, {VERSION_IMAGE_MAX_AGE}"
    if delivery.redirects(request.app[SETTINGS]) and (live := await delivery.live_as(pool, user_id, int(number))):
        return await _redirect(request, profiles.image_of(live, variant), cache)
    if request.method == "HEAD":
        return _image_response(
            request, await profiles.head_version_image(pool, blobs, user_id, int(number), variant), None, cache
        )
    _, image, data = await profiles.read_version_image(pool, blobs, user_id, int(number), variant)
    return _image_response(request, image, data, cache)


async def delete_profile(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    user_id = _user_id(request)
    await access.check_write(request, user_id)
    preconditions = _preconditions(request)
    await profiles.accept_delete(request.app[POOL], settings, user_id, preconditions)
    return web.Response(status=204)


async def get_intent(request: web.Request) -> web.Response:
    await access.check_read(request)
    try:
        intent_id = uuid.UUID(request.match_info["intent_id"])
    except ValueError:
        raise not_found("no such intent") from None
    try:
        intent = await profiles.intent(request.app[POOL], intent_id)
    except profiles.IntentNotFound:
        raise not_found("no such intent") from None
    return web.json_response(IntentOut.of(intent).model_dump(mode="json"))


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = {"database": _check(profiles.ping(request.app[POOL])), "blob_store": _check(request.app[BLOBS].ping())}
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    if all(result == "ok" for result in results.values()):
        return web.json_response(results)
    failing = ", ".join(name for name, result in results.items() if result != "ok")
    problem = Problem(
        503,
        "Not ready",
        f"not answering: {failing}",
        slug="not-ready",
        headers={"Retry-After": str(request.app[SETTINGS].retry_after_seconds)},
    )
    problem.errors = [{"field": name, "message": result} for name, result in results.items()]
    return problem.response()


async def _check(probe: Any) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_SECONDS):
            await probe
    except Exception as exc:  # any failure means "not ready", whatever its cause
        return f"unavailable: {exc.__class__.__name__}"
    return "ok"


async def openapi_document(_request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


def add_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.put("/v1/profiles/{user_id}", put_profile),
            web.get("/v1/profiles/{user_id}", get_profile),
            web.delete("/v1/profiles/{user_id}", delete_profile),
            web.get("/v1/profiles/{user_id}/image", get_live_image),
            web.get("/v1/profiles/{user_id}/versions/{version}/image", get_version_image),
            web.get("/v1/intents/{intent_id}", get_intent),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/openapi.json", openapi_document),
        ]
    )

"""Redirect delivery: the image routes hand out the exact key of the live version (presigned, or behind a
CDN) with the ETag and 304 of the bytes, and never a URL of a version that readers may not see."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from service.core.blobstore import open_blob_store
from service.core.settings import ImageDelivery, Settings
from service.dev.embedded import EmbeddedS3, S3Credentials
from tests.support import Client, MakeClient, StartWorker, blob_key, delivering, png, published

REDIRECT = ImageDelivery.REDIRECT


async def _redirected(client: Client, path: str, method: str = "GET") -> aiohttp.ClientResponse:
    response = await client.request(method, path, allow_redirects=False)
    assert response.status == 307, await response.text()
    return response


async def _fetch(url: str, method: str = "GET") -> tuple[aiohttp.ClientResponse, bytes]:
    """What a browser gets at a redirect's target: a request of its own, to the blob store."""
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response, await response.read()


@pytest.fixture
def signed_s3(scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedS3]:
    """An S3 server of its own that accepts only requests signed with its credentials (the session's
    accepts any), and those credentials in the environment."""
    credentials = S3Credentials.generate()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key)
    s3 = EmbeddedS3(scratch_dir / f"s3-signed-{uuid.uuid4().hex[:8]}", credentials=credentials)
    s3.start()
    yield s3
    s3.kill()


async def test_a_store_that_checks_signatures_accepts_a_presigned_url_only_for_its_key_and_method(
    signed_s3: EmbeddedS3,
) -> None:
    settings = Settings(database_url="postgresql://x/y", s3_endpoint_url=signed_s3.endpoint_url, s3_bucket="signed")
    data = png(9)
    async with open_blob_store(settings) as blobs:
        await blobs.ensure_bucket()
        await blobs.put_once("images/a", data, hashlib.sha256(data).hexdigest(), "image/png")
        await blobs.put_once("images/b", b"other", hashlib.sha256(b"other").hexdigest(), "text/plain")
        get = await blobs.presigned_url("images/a", head=False, expires_in=30)
        head = await blobs.presigned_url("images/a", head=True, expires_in=30)
    response, body = await _fetch(get)
    assert response.status == 200 and body == data
    assert (await _fetch(head, "HEAD"))[0].status == 200
    assert (await _fetch(head))[0].status == 403  # the method is part of the signature
    assert (await _fetch(get.replace("images/a", "images/b")))[0].status == 403
    assert (await _fetch(get.split("?")[0]))[0].status == 403


async def test_the_live_image_redirects_to_a_short_lived_presigned_url_of_exactly_the_live_key(
    make_client: MakeClient, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    client = await make_client(delivering(settings, REDIRECT, presign_expiry_seconds=45))
    body = await published(client, "ada", "Ada", png(1))
    key = await blob_key(settings.database_url, "ada", 1)
    etag = f'"{body["image"]["sha256"]}"'
    for path in ("/v1/profiles/ada/image", "/v1/profiles/ada/versions/1/image"):
        response = await _redirected(client, path)
        location = urlsplit(response.headers["Location"])
        assert f"{location.scheme}://{location.netloc}" == settings.s3_endpoint_url
        assert location.path == f"/{settings.s3_bucket}/{key}"
        assert parse_qs(location.query)["X-Amz-Expires"] == ["45"]
        assert response.headers["ETag"] == etag and response.headers["Cache-Control"] == "no-store"
        target, data = await _fetch(response.headers["Location"])
        assert target.status == 200 and data == png(1) and target.content_type == "image/png"


async def test_head_and_if_none_match_keep_working_in_redirect_mode(
    make_client: MakeClient, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    client = await make_client(delivering(settings, REDIRECT))
    body = await published(client, "bea", "Bea", png(2))
    etag = f'"{body["image"]["sha256"]}"'
    for path in ("/v1/profiles/bea/image", "/v1/profiles/bea/versions/1/image"):
        head = await _redirected(client, path, "HEAD")
        assert head.headers["ETag"] == etag
        target, _ = await _fetch(head.headers["Location"], "HEAD")
        assert target.status == 200 and target.headers["Content-Length"] == str(len(png(2)))
        unchanged = await client.get(path, headers={"If-None-Match": etag}, allow_redirects=False)
        assert unchanged.status == 304 and unchanged.headers["ETag"] == etag
        assert "Location" not in unchanged.headers


async def test_a_superseded_version_is_sent_by_the_api_and_a_deleted_profile_gets_no_redirect(
    make_client: MakeClient, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    client = await make_client(delivering(settings, REDIRECT))
    await published(client, "cy", "Cy", png(3))
    await published(client, "cy", "Cy 2", png(4))
    # Version 1's blob is already counting down to collection: a URL handed out now could outlive it.
    old = await client.get("/v1/profiles/cy/versions/1/image", allow_redirects=False)
    assert old.status == 200 and await old.read() == png(3)
    live = await _redirected(client, "/v1/profiles/cy/image")
    assert urlsplit(live.headers["Location"]).path.endswith(await blob_key(settings.database_url, "cy", 2))
    assert (await client.delete("/v1/profiles/cy")).status == 204
    for path in ("/v1/profiles/cy/image", "/v1/profiles/cy/versions/1/image", "/v1/profiles/cy/versions/2/image"):
        for method in ("GET", "HEAD"):
            gone = await client.request(method, path, allow_redirects=False)
            assert gone.status == 404 and "Location" not in gone.headers, (method, path)


async def test_behind_a_cdn_the_redirect_names_the_public_url_and_no_cache_may_keep_it(
    make_client: MakeClient, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    base = f"{settings.s3_endpoint_url}/{settings.s3_bucket}"
    client = await make_client(delivering(settings, REDIRECT, public_base_url=base))
    await published(client, "dee", "Dee", png(5))
    key = await blob_key(settings.database_url, "dee", 1)
    live = await _redirected(client, "/v1/profiles/dee/image")
    versioned = await _redirected(client, "/v1/profiles/dee/versions/1/image")
    assert live.headers["Location"] == versioned.headers["Location"] == f"{base}/{key}"
    # A kept redirect could be revalidated (304) past its blob's collection (found in review).
    assert live.headers["Cache-Control"] == versioned.headers["Cache-Control"] == "no-store"


def test_a_presign_expiry_that_with_the_request_deadline_reaches_the_grace_period_is_refused_in_redirect_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = "postgresql://x/y"
    monkeypatch.setenv("PROFILES_IMAGE_DELIVERY", "redirect")
    # The defaults: a 300 s grace period, a 30 s request deadline.
    monkeypatch.setenv("PROFILES_PRESIGN_EXPIRY_SECONDS", "270")
    with pytest.raises(ValueError, match="PROFILES_PRESIGN_EXPIRY_SECONDS"):
        Settings(database_url=database)
    monkeypatch.setenv("PROFILES_PRESIGN_EXPIRY_SECONDS", "269")
    assert Settings(database_url=database).image_delivery is REDIRECT
    monkeypatch.setenv("PROFILES_IMAGE_DELIVERY", "cdn")
    with pytest.raises(ValueError, match="image_delivery"):
        Settings(database_url=database)
    monkeypatch.delenv("PROFILES_IMAGE_DELIVERY")
    with pytest.raises(ValueError, match="PROFILES_PUBLIC_BASE_URL"):
        Settings(database_url=database, public_base_url="https://cdn.example", auth_reads_require_token=True)

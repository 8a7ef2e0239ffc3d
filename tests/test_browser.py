"""Headless Chromium shows profile pictures embedded in a web page, in both delivery modes: every <img>
(the live image, a variant, the live version's URL and its variant, a superseded version's URL) decodes
at its expected size."""

from __future__ import annotations

import html

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.core.settings import ImageDelivery, Settings
from tests.support import Browser, MakeClient, StartWorker, delivering, png, published

# Resolves once every image has loaded and decoded (or failed to: then its size is 0 x 0).
DECODED_SIZES = """
return Promise.all(Array.from(document.images, (img) => img.decode().then(
    () => [img.id, img.naturalWidth, img.naturalHeight], () => [img.id, 0, 0])));
"""


def _page(images: dict[str, str]) -> web.Application:
    """A page of the test suite, not of the product: a site on another origin embedding profile pictures."""
    tags = "".join(f'<img id="{name}" src="{html.escape(url)}">' for name, url in images.items())
    document = f"<!doctype html><meta charset=utf-8><title>profile pictures</title>{tags}"

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=document, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    return app


@pytest.mark.parametrize("delivery", list(ImageDelivery))
async def test_a_browser_decodes_every_profile_picture_at_its_size(
    browser: Browser,
    make_client: MakeClient,
    settings: Settings,
    start_worker: StartWorker,
    delivery: ImageDelivery,
) -> None:
    await start_worker()
    api = await make_client(delivering(settings, delivery))
    await published(api, "ada", "Ada", png(1, (40, 30)))
    await published(api, "ada", "Ada", png(2, (400, 300)))
    images = {
        "live": "/v1/profiles/ada/image",
        "live-thumb": "/v1/profiles/ada/image?variant=thumb",
        "version-2": "/v1/profiles/ada/versions/2/image",
        "version-2-small": "/v1/profiles/ada/versions/2/image?variant=small",
        "version-1": "/v1/profiles/ada/versions/1/image",
    }
    live = await api.get(images["live"], allow_redirects=False)
    assert live.status == {ImageDelivery.PROXY: 200, ImageDelivery.REDIRECT: 307}[delivery]
    page = TestServer(_page({name: str(api.make_url(path)) for name, path in images.items()}))
    await page.start_server()
    try:
        await browser.open(str(page.make_url("/")))
        sizes = {name: (width, height) for name, width, height in await browser.script(DECODED_SIZES)}
        await browser.screenshot(f"profile-pictures-{delivery}")
    finally:
        await page.close()
    assert sizes == {
        "live": (400, 300),
        "live-thumb": (64, 48),
        "version-2": (400, 300),
        "version-2-small": (256, 192),
        "version-1": (40, 30),
    }

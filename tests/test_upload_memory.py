"""The upload memory budget: what an image's check is charged covers what it really holds, for as long
as it holds it (each case found by a review), and the images cameras write are still accepted."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from service.api import handlers
from service.api.state import BUDGET
from service.core import images
from service.core.settings import Settings
from tests.support import MakeClient, eventually, png, put_profile

SIDE = 4000
# What a decode may hold beyond its charge: the interpreter's own noise in a fresh process.
SLACK_BYTES = 16 * 1024 * 1024

# Run in a fresh interpreter: the growth of its peak RSS while one decode runs. VmHWM, not ru_maxrss:
# Linux carries ru_maxrss over from the parent across exec.
_MEASURE = r"""
import re, sys
from service.core.images import decode, read_header
def peak():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
data = open(sys.argv[1], "rb").read()
before = peak()
decode(data, read_header(data, 10_000))
print(peak() - before)
"""


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _solid(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (SIDE, SIDE), (200, 30, 40))


IMAGES: dict[str, Callable[[], bytes]] = {
    "baseline JPEG": lambda: _saved(_solid(), "JPEG", quality=10),
    "RGB PNG": lambda: _saved(_solid(), "PNG"),
    "progressive JPEG": lambda: _saved(_solid(), "JPEG", quality=10, progressive=True, subsampling=0),
    "progressive CMYK JPEG": lambda: _saved(_solid("CMYK"), "JPEG", quality=10, progressive=True),
    "lossy WebP": lambda: _saved(_solid(), "WEBP", quality=10),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_the_bytes_charged_for_checking_an_image_cover_what_its_decode_really_holds(kind: str, tmp_path: Path) -> None:
    data = IMAGES[kind]()
    charged = images.read_header(data, 10_000).decode_bytes
    path = tmp_path / "image"
    path.write_bytes(data)
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True
    ).stdout
    peak = int(measured)
    assert peak <= charged + SLACK_BYTES, f"{kind} of {len(data)} bytes: charged {charged}, peak {peak}"


async def test_a_request_cut_off_by_its_deadline_keeps_its_bytes_charged_while_its_check_still_runs(
    make_client: MakeClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    started = threading.Event()

    def decode_when_let(data: bytes, header: images.ImageHeader) -> images.ImageInfo:
        started.set()
        gate.wait()
        return images.decode(data, header)

    monkeypatch.setattr(handlers, "decode", decode_when_let)
    client = await make_client(settings.model_copy(update={"request_timeout_seconds": 1.0}))
    budget = client.app[BUDGET]
    try:
        # Wider than the images checked on the event loop: its check runs in a thread.
        response = await put_profile(client, "fay", {"display_name": "Fay"}, png(13, (300, 300)))
        assert response.status == 503, await response.text()
        assert started.is_set()
        # The thread still holds the image and its decoded pixels: the budget must still count them.
        assert budget.in_flight > 0
    finally:
        gate.set()

    async def returned() -> bool:
        return budget.in_flight == 0

    await eventually(returned, what="the check's bytes to return")


async def test_a_client_that_disconnects_mid_body_gives_its_reservation_back(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings)
    budget = client.app[BUDGET]
    head = (
        "PUT /v1/profiles/kit HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500000\r\n\r\n"
    )
    part = '--b\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"display_name": "Kit"}\r\n'
    _reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head.encode() + part.encode())
    await writer.drain()

    async def charged() -> bool:
        return budget.in_flight > 0

    async def returned() -> bool:
        return budget.in_flight == 0

    await eventually(charged, what="the upload to be charged")
    writer.close()
    await writer.wait_closed()
    await eventually(returned, what="the reservation to return after the disconnect")


def test_only_images_whose_check_is_cheap_are_checked_on_the_event_loop() -> None:
    assert images.read_header(png(1), 10_000).decodes_inline
    assert not images.read_header(png(1, (300, 300)), 10_000).decodes_inline
    # A WebP of 200 x 200 pixels is decoded through four copies of them.
    assert not images.read_header(_saved(Image.new("RGB", (200, 200)), "WEBP"), 10_000).decodes_inline
    assert images.read_header(_saved(Image.new("RGB", (100, 100)), "WEBP"), 10_000).decodes_inline


async def test_a_jpeg_with_a_multi_picture_index_is_accepted_as_a_jpeg(
    make_client: MakeClient, settings: Settings
) -> None:
    # Cameras and phones write MPO (CIPA DC-007): a baseline JPEG whose APP2 segment indexes more pictures.
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    data = _saved(first, "MPO", save_all=True, append_images=[second])
    assert data[:3] == b"\xff\xd8\xff"
    client = await make_client(settings)
    response = await put_profile(client, "gus", {"display_name": "Gus"}, data)
    assert response.status == 202, await response.text()
    assert (await response.json())["version"] == 1

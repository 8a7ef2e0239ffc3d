"""Bad input: one test per kind, each answered with its status and problem+json, storing nothing."""

from __future__ import annotations

import asyncio
import io
import json
import random

import aiohttp
import pytest
from PIL import Image

from service.core.blobstore import BlobStore
from service.core.settings import Settings
from tests.support import (
    EMPTY,
    Client,
    MakeClient,
    assert_problem,
    eventually,
    png,
    put_profile,
    status_line_before_body,
    table_counts,
    upload_form,
)


@pytest.mark.usefixtures("nothing_stored")
async def test_a_missing_image_part_is_400(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("metadata", json.dumps({"display_name": "A"}), content_type="application/json")
    body = await assert_problem(await client.put("/v1/profiles/u1", data=form), 400)
    assert "image" in body["detail"]


@pytest.mark.usefixtures("nothing_stored")
async def test_an_extra_part_is_400(client: Client) -> None:
    form = upload_form({"display_name": "A"}, png(1), extra={"banner": b"x"})
    body = await assert_problem(await client.put("/v1/profiles/u1", data=form), 400)
    assert "banner" in body["detail"]


@pytest.mark.usefixtures("nothing_stored")
async def test_metadata_that_is_not_json_is_400(client: Client) -> None:
    await assert_problem(await put_profile(client, "u1", "{display_name: A", png(1)), 400)


@pytest.mark.usefixtures("nothing_stored")
async def test_an_unknown_metadata_field_is_422_with_field_errors(client: Client) -> None:
    body = await assert_problem(await put_profile(client, "u1", {"display_name": "A", "admin": True}, png(1)), 422)
    assert [error["field"] for error in body["errors"]] == ["admin"]


@pytest.mark.usefixtures("nothing_stored")
async def test_metadata_breaking_its_limits_is_422(client: Client) -> None:
    cases = [
        {},
        {"display_name": ""},
        {"display_name": "x" * 101},
        {"display_name": "A", "bio": "b" * 1001},
        {"display_name": "A", "website": "ftp://example.com"},
        {"display_name": 7},
        {"display_name": "nul\u0000byte"},
        {"display_name": "bell\u0007"},
    ]
    for metadata in cases:
        await assert_problem(await put_profile(client, "u1", metadata, png(1)), 422)


@pytest.mark.usefixtures("nothing_stored")
async def test_a_text_file_named_png_is_415(client: Client) -> None:
    await assert_problem(await put_profile(client, "u1", {"display_name": "A"}, b"just some text\n" * 20), 415)


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
@pytest.mark.parametrize("kept", [0.5, 0.01])
async def test_a_truncated_image_of_each_accepted_type_is_400(client: Client, fmt: str, kept: float) -> None:
    # Cut in the pixels, or in the headers (a WebP cut there once failed inside Pillow's open: a 500).
    out = io.BytesIO()
    Image.frombytes("RGB", (200, 200), random.Random(fmt).randbytes(200 * 200 * 3)).save(out, fmt)
    image = out.getvalue()
    response = await put_profile(client, "u1", {"display_name": "A"}, image[: max(20, int(len(image) * kept))])
    # Cut short in its headers, an image may no longer be recognisable at all.
    body = await assert_problem(response, 415 if response.status == 415 and kept < 0.5 else 400)
    assert body["status"] == 415 or "decoded" in body["detail"]


@pytest.mark.usefixtures("nothing_stored")
async def test_an_image_20000_pixels_wide_is_413(client: Client) -> None:
    out = io.BytesIO()
    Image.new("1", (20_000, 1)).save(out, "PNG")
    body = await assert_problem(await put_profile(client, "u1", {"display_name": "A"}, out.getvalue()), 413)
    assert "20000x1" in body["detail"]


@pytest.mark.usefixtures("nothing_stored")
async def test_an_image_header_claiming_a_decompression_bomb_is_413(client: Client) -> None:
    out = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(out, "PNG")
    await assert_problem(await put_profile(client, "u1", {"display_name": "A"}, out.getvalue()), 413)


@pytest.mark.usefixtures("nothing_stored")
async def test_an_invalid_user_id_is_400(client: Client) -> None:
    for user_id in ("-starts-with-dash", "has space", "x" * 129, "semi;colon"):
        await assert_problem(await put_profile(client, user_id, {"display_name": "A"}, png(1)), 400)


@pytest.mark.usefixtures("nothing_stored")
async def test_a_declared_body_over_the_limit_is_413_without_reading_it(client: Client) -> None:
    assert (await status_line_before_body(client, "u1", 1_073_741_824)).startswith(b"HTTP/1.1 413")


async def test_an_oversized_image_is_413_before_the_whole_body_is_read(
    make_client: MakeClient,
    settings: Settings,
    blobs: BlobStore,
) -> None:
    client = await make_client(settings.model_copy(update={"max_image_bytes": 64 * 1024}))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"PUT /v1/profiles/u1 HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    head = (
        b'--b\r\nContent-Disposition: form-data; name="metadata"\r\nContent-Type: application/json\r\n\r\n'
        b'{"display_name": "A"}\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    ) + png(3)
    total = 256 * 1024 * 1024
    sent = 0

    async def send() -> None:
        nonlocal sent
        chunk = b"\0" * (256 * 1024)
        for piece in [head] + [chunk] * (total // len(chunk)):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            sent += len(piece)

    sender = asyncio.create_task(send())
    status = await asyncio.wait_for(reader.readline(), 30)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    assert status.startswith(b"HTTP/1.1 413")
    assert sent < total // 4, f"the server read {sent} bytes before refusing"
    assert await table_counts(settings.database_url) == EMPTY
    assert await blobs.list_keys(settings.s3_key_prefix) == []


async def test_an_idempotency_key_reused_with_another_body_is_422_and_changes_nothing(
    client: Client,
    settings: Settings,
    blobs: BlobStore,
) -> None:
    headers = {"Idempotency-Key": "key-1"}
    first = await put_profile(client, "u1", {"display_name": "A"}, png(4), headers)
    assert first.status == 202
    before = await table_counts(settings.database_url)
    await assert_problem(await put_profile(client, "u1", {"display_name": "B"}, png(4), headers), 422)
    await assert_problem(await put_profile(client, "u1", {"display_name": "A"}, png(5), headers), 422)
    assert await table_counts(settings.database_url) == before
    assert await blobs.list_keys(settings.s3_key_prefix) == []


async def declare_upload(client: Client, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"PUT /v1/profiles/u9 HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n--b\r\n" % size
    )
    await writer.drain()
    return reader, writer


async def test_uploads_beyond_the_in_flight_byte_budget_get_503_until_bytes_are_released(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(
        settings.model_copy(update={"max_image_bytes": 128 * 1024, "max_inflight_upload_bytes": 512 * 1024})
    )
    _, slow = await declare_upload(client, 150 * 1024)  # holds twice 150 KiB while it trickles in
    small = await put_profile(client, "u1", {"display_name": "A"}, png(1))
    assert small.status == 202
    reader, writer = await declare_upload(client, 150 * 1024)
    refused = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After" in refused
    slow.close()

    # Polled: the API releases the bytes once it notices the closed connection, and tells nobody.
    async def admitted() -> bool:
        r, w = await declare_upload(client, 150 * 1024)
        w.write(b"garbage\r\n--b--\r\n" + b"x" * (150 * 1024))
        answer = await asyncio.wait_for(r.read(4096), 10)
        w.close()
        return not answer.startswith(b"HTTP/1.1 503")

    await eventually(admitted, what="the slow upload's bytes to be released")


def _solid_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (9, 99, 199)).save(out, "PNG")
    return out.getvalue()


async def test_the_upload_budget_counts_the_pixels_an_image_decodes_to_not_only_its_bytes(
    make_client: MakeClient, settings: Settings
) -> None:
    # A few KiB of PNG that decode to 4 MB: charged by its bytes only, it would slip in beside another upload.
    client = await make_client(
        settings.model_copy(update={"max_image_bytes": 128 * 1024, "max_inflight_upload_bytes": 1024 * 1024})
    )
    image = _solid_png(1000)
    assert len(image) < 64 * 1024
    _, slow = await declare_upload(client, 16 * 1024)
    await assert_problem(await put_profile(client, "u1", {"display_name": "A"}, image), 503)
    slow.close()

    # Alone, the same upload is accepted: more than the whole budget, but within the contract's limits.
    async def accepted() -> bool:
        return (await put_profile(client, "u1", {"display_name": "A"}, image)).status == 202

    await eventually(accepted, what="the image to be accepted once it has the budget to itself")

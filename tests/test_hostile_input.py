"""Hostile clients: write floods, oversized multipart headers, slow senders and unnormalised text.
Each protection is shown to hold and to store nothing (the size and budget limits are in
test_bad_input.py)."""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
from collections.abc import AsyncIterator

import pytest

from service.api.app import serve
from service.api.ratelimit import RateLimited, TokenBuckets, client_address
from service.core.settings import Settings
from service.dev.embedded import free_port
from tests.support import (
    EMPTY,
    Client,
    MakeClient,
    StartWorker,
    accepted,
    assert_problem,
    png,
    put_profile,
    table_counts,
)


def limited(settings: Settings, **limits: float) -> Settings:
    values = {"write_rate_per_user_per_minute": 1.0, "write_rate_per_ip_per_minute": 1.0} | limits
    return settings.model_copy(update=values)


async def test_a_burst_of_writes_to_one_profile_gets_429_with_retry_after(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(limited(settings, write_burst_per_user=2, write_burst_per_ip=100))
    for i in range(2):
        await accepted(client, "ann", {"display_name": str(i)}, png(i))
    refused = await put_profile(client, "ann", {"display_name": "again"}, png(3))
    await assert_problem(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await client.delete("/v1/profiles/ann")).status == 429
    await accepted(client, "bob", {"display_name": "B"}, png(4))  # another profile has its own bucket
    assert (await table_counts(settings.database_url))["versions"] == 3


async def test_one_address_writing_to_many_profiles_is_limited_too(make_client: MakeClient, settings: Settings) -> None:
    client = await make_client(limited(settings, write_burst_per_user=10, write_burst_per_ip=3))
    for i in range(3):
        await accepted(client, f"user-{i}", {"display_name": "x"}, png(i))
    await assert_problem(await put_profile(client, "user-9", {"display_name": "x"}, png(9)), 429)
    assert (await table_counts(settings.database_url))["versions"] == 3


async def test_forwarded_addresses_count_only_behind_trusted_proxies(
    make_client: MakeClient, settings: Settings
) -> None:
    direct = await make_client(limited(settings, write_burst_per_ip=1))
    await accepted(direct, "u1", {"display_name": "x"}, png(1), {"X-Forwarded-For": "198.51.100.1"})
    spoofed = await put_profile(direct, "u2", {"display_name": "x"}, png(2), {"X-Forwarded-For": "198.51.100.2"})
    assert spoofed.status == 429  # without a trusted proxy the header is the client's word, ignored
    proxied = await make_client(limited(settings, write_burst_per_ip=1, trusted_proxy_hops=1))
    for i, address in enumerate(("203.0.113.1", "203.0.113.2")):
        await accepted(proxied, f"p{i}", {"display_name": "x"}, png(10 + i), {"X-Forwarded-For": f"1.2.3.4, {address}"})


def test_token_buckets_refill_at_their_rate_and_forget_the_least_recent_keys() -> None:
    buckets = TokenBuckets("profile", per_minute=60, burst=2, max_keys=2)
    buckets.take("a", now=0.0)
    buckets.take("a", now=0.0)
    with pytest.raises(RateLimited) as refused:
        buckets.take("a", now=0.5)
    assert refused.value.retry_after == 1
    buckets.take("a", now=1.5)  # one token back after a second
    buckets.take("b", now=1.5)
    buckets.take("c", now=1.5)  # a third key evicts "a", the least recently used
    buckets.take("a", now=1.5)
    buckets.take("a", now=1.5)
    assert client_address("10.0.0.1", "6.6.6.6, 7.7.7.7", trusted_hops=2) == "6.6.6.6"
    assert client_address("10.0.0.1", "7.7.7.7", trusted_hops=2) == "10.0.0.1"


def raw_upload(part_headers: str) -> bytes:
    return (
        (
            '--b\r\nContent-Disposition: form-data; name="metadata"\r\nContent-Type: application/json\r\n'
            f'{part_headers}\r\n{{"display_name": "A"}}\r\n--b\r\n'
            'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + png(1)
        + b"\r\n--b--\r\n"
    )


@pytest.mark.parametrize(
    "extra", [f"X-Padding: {'p' * 2000}\r\n", "".join(f"X-H{i}: v\r\n" for i in range(20))], ids=["long", "many"]
)
async def test_oversized_multipart_part_headers_are_400_and_store_nothing(
    client: Client, settings: Settings, extra: str
) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    await assert_problem(await client.put("/v1/profiles/ann", data=raw_upload(extra), headers=headers), 400)
    assert await table_counts(settings.database_url) == EMPTY
    # The same body without the padding is accepted: the headers were the only problem.
    assert (await client.put("/v1/profiles/ann", data=raw_upload(""), headers=headers)).status == 202


@pytest.mark.usefixtures("nothing_stored")
async def test_an_oversized_request_header_is_refused(client: Client) -> None:
    response = await put_profile(client, "ann", {"display_name": "A"}, png(1), {"X-Padding": "p" * 10_000})
    assert 400 <= response.status < 500


async def test_metadata_text_is_stored_in_nfc(client: Client, start_worker: StartWorker) -> None:
    await start_worker()
    decomposed = " ".join(["Jose\u0301"] * 20)  # 119 code points: too long, until the accents are composed
    metadata = {"display_name": decomposed, "bio": "Zoe\u0308"}
    response = await put_profile(client, "jose", metadata, png(1), {"Prefer": "wait=20"})
    assert response.status == 200, await response.text()
    profile = await (await client.get("/v1/profiles/jose")).json()
    assert profile["metadata"] == {"display_name": unicodedata.normalize("NFC", decomposed), "bio": "Zo\u00eb"}
    assert len(profile["metadata"]["display_name"]) == 99


@contextlib.asynccontextmanager
async def real_server(settings: Settings) -> AsyncIterator[int]:
    """`profiles api`'s own server (its connection options included) on a free loopback port."""
    port, stop = free_port(), asyncio.Event()
    task = asyncio.create_task(serve(settings, "127.0.0.1", port, stop))
    try:
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield port
    finally:
        stop.set()
        await task


async def test_a_client_trickling_its_headers_is_disconnected(settings: Settings) -> None:
    async with real_server(settings.model_copy(update={"idle_connection_seconds": 0.5})) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /v1/profiles/ann HTTP/1.1\r\nHost: x\r\n")
        closed = asyncio.create_task(reader.read())
        for i in range(100):  # a header line every 0.1 s, never the blank line that ends them
            if closed.done():
                break
            writer.write(f"X-Slow-{i}: 1\r\n".encode())
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(closed, 5) == b"", "the server never closed the connection"
        writer.close()


@pytest.mark.usefixtures("nothing_stored")
async def test_a_client_trickling_its_body_gets_408_and_nothing_is_stored(
    make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings.model_copy(update={"body_timeout_seconds": 0.5}))
    body = raw_upload("")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"PUT /v1/profiles/ann HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:100]
    )
    status = asyncio.create_task(reader.readline())
    for byte in body[100:200]:  # one byte every 0.05 s: the whole body would take minutes
        if status.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    assert (await asyncio.wait_for(status, 10)).startswith(b"HTTP/1.1 408")
    writer.close()

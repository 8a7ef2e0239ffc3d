"""The S3 adapter: conditional, checksummed uploads, verification and reads of immutable blobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from opentelemetry.trace import SpanKind

from service.core import tracing
from service.core.settings import Settings

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
CHUNK_BYTES = 256 * 1024


# What the client raises when the store cannot be reached or answers what is not S3 (a store still
# starting up has answered another server's JSON); botocore's parse error is no BotoCoreError.
UNREACHABLE = (BotoCoreError, ResponseParserError)


class BlobStoreError(Exception):
    """The blob store could not do what was asked (unreachable, refused, or wrong content)."""


class BlobNotFound(BlobStoreError):
    pass


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class BlobHead:
    size: int
    sha256: str | None


@contextmanager
def _store_errors(what: str, key: str) -> Iterator[None]:
    """The S3 client's errors as ours: BlobNotFound for a missing key, BlobStoreError for the rest."""
    try:
        yield
    except ClientError as exc:
        if _error_code(exc) in NOT_FOUND_CODES:
            raise BlobNotFound(key) from exc
        raise BlobStoreError(f"{what} of {key} failed: {exc}") from exc
    except UNREACHABLE as exc:
        raise BlobStoreError(f"{what} of {key} failed: {exc}") from exc


class BlobStore:
    def __init__(self, client: Any, bucket: str, credentials: Any = None) -> None:
        self._client = client
        self.bucket = bucket
        # The client's own credentials (refreshed when they expire), for presigning.
        self._credentials = credentials

    @contextmanager
    def _span(self, operation: str, key: str | None = None) -> Iterator[None]:
        """A client span per S3 request: botocore's instrumentation patches the synchronous client
        only, and never sees aiobotocore's calls."""
        attributes = {
            "rpc.system": "aws-api",
            "rpc.service": "S3",
            "rpc.method": operation,
            "aws.s3.bucket": self.bucket,
        }
        if key is not None:
            attributes["aws.s3.key"] = key
        with tracing.tracer().start_as_current_span(f"S3.{operation}", kind=SpanKind.CLIENT, attributes=attributes):
            yield

    async def put_once(self, key: str, data: bytes, sha256: str, content_type: str) -> None:
        """Upload `data` to a key nobody wrote yet, and make sure the store holds exactly it.

        If-None-Match makes the upload create-only, so nothing is ever overwritten. The store checks
        the bytes against ChecksumSHA256 and echoes it: that echo is the verification, and costs no
        second request. Without the echo (a store that ignores checksums), or after a 412 (an
        earlier attempt of this same intent got there first), a HEAD decides what the key holds.
        """
        checksum = base64.b64encode(binascii.unhexlify(sha256)).decode()
        try:
            with self._span("PutObject", key):
                response = await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    ChecksumSHA256=checksum,
                    IfNoneMatch="*",
                )
        except ClientError as exc:
            if _error_code(exc) not in {"PreconditionFailed", "412"}:
                raise BlobStoreError(f"upload of {key} failed: {exc}") from exc
        except UNREACHABLE as exc:
            raise BlobStoreError(f"upload of {key} failed: {exc}") from exc
        else:
            if response.get("ChecksumSHA256") == checksum:
                return
        await self.verify(key, len(data), sha256)

    async def verify(self, key: str, size: int, sha256: str) -> None:
        head = await self.head(key)
        if head.size != size or head.sha256 != sha256:
            raise BlobStoreError(
                f"{key} holds {head.size} bytes with sha256 {head.sha256}, expected {size} and {sha256}"
            )

    async def head(self, key: str) -> BlobHead:
        with _store_errors("head", key), self._span("HeadObject", key):
            resp = await self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        checksum = resp.get("ChecksumSHA256")
        return BlobHead(int(resp["ContentLength"]), _b64_to_hex(checksum) if checksum else None)

    async def read(self, key: str) -> bytes:
        with self._span("GetObject", key):
            with _store_errors("read", key):
                resp = await self._client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                return b"".join([chunk async for chunk in body.iter_chunks(CHUNK_BYTES)])
            except (*UNREACHABLE, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                raise BlobStoreError(f"read of {key} broke off: {exc!r}") from exc
            finally:
                body.close()

    async def presigned_url(self, key: str, *, head: bool, expires_in: int) -> str:
        """A path-style SigV4 URL that lets its holder GET (or HEAD: the method is signed) `key` for
        `expires_in` seconds. Signed here, with no request to the store: botocore's own signer, without
        the client's generate_presigned_url, which resolves endpoint rules per call at 4x the cost."""
        if self._credentials is None:
            raise BlobStoreError(f"presigning {key} failed: no credentials to sign with")
        frozen = await self._credentials.get_frozen_credentials()
        url = f"{self._client.meta.endpoint_url}/{self.bucket}/{quote(key, safe='/~')}"
        request = AWSRequest(method="HEAD" if head else "GET", url=url)
        S3SigV4QueryAuth(frozen, "s3", self._client.meta.region_name, expires=expires_in).add_auth(request)
        signed: str = request.url
        return signed

    async def key_pages(self, prefix: str) -> AsyncIterator[list[str]]:
        """The keys under `prefix`, one listing page (up to 1,000 keys) at a time."""
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield [item["Key"] for item in page.get("Contents", [])]
        except (ClientError, *UNREACHABLE) as exc:
            raise BlobStoreError(f"listing {prefix!r} failed: {exc}") from exc

    async def list_keys(self, prefix: str) -> list[str]:
        return [key async for page in self.key_pages(prefix) for key in page]

    async def delete(self, key: str) -> None:
        try:
            with self._span("DeleteObject", key):
                await self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, *UNREACHABLE) as exc:
            raise BlobStoreError(f"delete of {key} failed: {exc}") from exc

    async def ping(self) -> None:
        try:
            with self._span("HeadBucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, *UNREACHABLE) as exc:
            raise BlobStoreError(f"bucket {self.bucket} is not reachable: {exc}") from exc

    async def ensure_bucket(self, *, wait_seconds: float = 30.0) -> None:
        """Create the bucket if missing, waiting for a store that is still starting up."""
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                error: Exception = exc
                if _error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                    # A store still starting may refuse, or answer what is not S3 (SeaweedFS has
                    # answered its filer's JSON): both are retried, until the deadline.
                    try:
                        await self._client.create_bucket(Bucket=self.bucket)
                        continue
                    except (ClientError, *UNREACHABLE) as refused:
                        error = refused
            except UNREACHABLE as exc:
                error = exc
            if asyncio.get_running_loop().time() > deadline:
                raise BlobStoreError(f"bucket {self.bucket} cannot be created: {error}")
            await asyncio.sleep(0.2)


@asynccontextmanager
async def open_blob_store(settings: Settings, *, attempts: int = 2) -> AsyncIterator[BlobStore]:
    """An S3 client for the configured bucket, with timeouts short enough to fail fast."""
    config = AioConfig(
        connect_timeout=3,
        read_timeout=max(10.0, settings.attempt_deadline_seconds),
        retries={"total_max_attempts": attempts, "mode": "standard"},
        max_pool_connections=max(10, settings.worker_concurrency),
        s3={"addressing_style": "path"},
    )
    session = aioboto3.Session()
    async with session.client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
    ) as client:
        yield BlobStore(client, settings.s3_bucket, await session.get_credentials())

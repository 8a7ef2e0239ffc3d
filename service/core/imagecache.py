"""Verified bytes of live images, kept in the API's memory: a blob key's bytes never change, so
only the pointer has to be read for each request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

from cachetools import LRUCache

from service.core.blobstore import BlobStoreError
from service.core.metrics import IMAGE_CACHE

# No one image may take more than this share of the cache, so a few large originals cannot push
# out the many small variants that most reads ask for.
LARGEST_SHARE = 8
# What an entry costs beside its bytes (its key's strings, the tuple, the dictionary's and the LRU
# order's slots): about 580 bytes by tracemalloc, so that a cache of tiny thumbnails (a flat 64-pixel
# WebP is 86 bytes) stays within its bound too.
ENTRY_OVERHEAD = 1024

Entry = tuple[str, str]


class ImageCache:
    """Least recently used first out, bounded by the memory its entries hold; entries are (blob key,
    sha256): the bytes that key was verified to hold. Concurrent misses of one entry share one read."""

    def __init__(self, max_bytes: int, read_timeout: float) -> None:
        self._entries: LRUCache[Entry, bytes] = LRUCache(maxsize=max(max_bytes, 1), getsizeof=_cost)
        self._largest = max_bytes // LARGEST_SHARE
        self._reading: dict[Entry, asyncio.Future[bytes]] = {}
        self._read_timeout = read_timeout

    async def read_through(self, blob_key: str, sha256: str, read: Callable[[], Awaitable[bytes]]) -> bytes:
        """The entry's bytes, from memory or else from `read` (which must verify them). A popular image
        just replaced is missed by all its readers at once: they wait for one read, not one each."""
        entry = (blob_key, sha256)
        data = self._entries.get(entry)
        IMAGE_CACHE.labels("miss" if data is None else "hit").inc()
        if data is not None:
            return data
        reading = self._reading.get(entry)
        if reading is None:
            reading = self._reading[entry] = asyncio.ensure_future(self._bounded(read))
            reading.add_done_callback(partial(self._read, entry))
        # A reader that gives up (its client left) must not cancel the read the others wait for.
        return await asyncio.shield(reading)

    async def _bounded(self, read: Callable[[], Awaitable[bytes]]) -> bytes:
        """No request's deadline cancels a shared read, so it has one of its own: a store that hangs
        must not hold every later reader of the image until it answers. Readers waiting for it get a
        store error, and read the pointer and the blob again."""
        try:
            async with asyncio.timeout(self._read_timeout):
                return await read()
        except TimeoutError as exc:
            raise BlobStoreError(f"a read of the blob took longer than {self._read_timeout} s") from exc

    def _read(self, entry: Entry, reading: asyncio.Future[bytes]) -> None:
        del self._reading[entry]
        if not reading.cancelled() and reading.exception() is None:
            self._put(entry, reading.result())

    def _put(self, entry: Entry, data: bytes) -> None:
        if _cost(data) <= self._largest:
            self._entries[entry] = data


def _cost(data: bytes) -> int:
    return len(data) + ENTRY_OVERHEAD

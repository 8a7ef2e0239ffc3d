"""Verified bytes of live images, kept in the API's memory: a blob key's bytes never change, so
only the pointer has to be read for each request."""

from __future__ import annotations

from cachetools import LRUCache

from service.core.metrics import IMAGE_CACHE

# No one image may take more than this share of the cache, so a few large originals cannot push
# out the many small variants that most reads ask for.
LARGEST_SHARE = 8
# What an entry costs beside its bytes (its key's strings, the tuple, the dictionary's and the LRU
# order's slots): about 580 bytes by tracemalloc, so that a cache of tiny thumbnails (a flat 64-pixel
# WebP is 86 bytes) stays within its bound too.
ENTRY_OVERHEAD = 1024


class ImageCache:
    """Least recently used first out, bounded by the memory its entries hold; entries are (blob key,
    sha256): the bytes that key was verified to hold."""

    def __init__(self, max_bytes: int) -> None:
        self._entries: LRUCache[tuple[str, str], bytes] = LRUCache(maxsize=max(max_bytes, 1), getsizeof=_cost)
        self._largest = max_bytes // LARGEST_SHARE

    def get(self, blob_key: str, sha256: str) -> bytes | None:
        data = self._entries.get((blob_key, sha256))
        IMAGE_CACHE.labels("miss" if data is None else "hit").inc()
        return data

    def put(self, blob_key: str, sha256: str, data: bytes) -> None:
        if _cost(data) <= self._largest:
            self._entries[(blob_key, sha256)] = data


def _cost(data: bytes) -> int:
    return len(data) + ENTRY_OVERHEAD

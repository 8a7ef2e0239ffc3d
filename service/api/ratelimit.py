"""Write rate limits: token buckets per profile and per client address, kept in each API process.

Hand-written because the usual libraries (limits, aiolimiter) offer windows or a single leaky
bucket, not keyed token buckets; the whole algorithm is the few lines of `TokenBuckets.take`."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

# Memory stays bounded however many addresses write: the least recently used bucket is forgotten,
# which at worst gives that key a fresh burst.
MAX_KEYS = 100_000


class RateLimited(Exception):
    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(f"too many writes for this {what}; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """`burst` tokens per key, refilled at `per_minute` / 60 a second; a write takes one."""

    def __init__(self, what: str, per_minute: float, burst: int, max_keys: int = MAX_KEYS) -> None:
        self._what = what
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> None:
        """Take a token for `key`, or raise RateLimited saying when the next one is due."""
        if self._rate <= 0:
            return
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(key, None) or _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            raise RateLimited(self._what, math.ceil((1.0 - bucket.tokens) / self._rate))
        bucket.tokens -= 1.0


def client_address(peer: str | None, forwarded_for: str | None, trusted_hops: int) -> str:
    """The caller's address: the peer itself, or, behind `trusted_hops` proxies that each append to
    X-Forwarded-For, the entry the outermost trusted proxy wrote (earlier entries can be forged)."""
    if trusted_hops and forwarded_for:
        hops = [entry.strip() for entry in forwarded_for.split(",") if entry.strip()]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops]
    return peer or "unknown"


@dataclass(frozen=True)
class WriteLimits:
    per_user: TokenBuckets
    per_address: TokenBuckets

    @classmethod
    def of(cls, per_user_minute: float, user_burst: int, per_address_minute: float, address_burst: int) -> WriteLimits:
        return cls(
            TokenBuckets("profile", per_user_minute, user_burst),
            TokenBuckets("client address", per_address_minute, address_burst),
        )

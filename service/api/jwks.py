"""Signing keys published at a JWKS URL, fetched with aiohttp and cached, so that an issuer can
rotate its keys without a restart of the API."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import jwt

log = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 5.0
# Only asymmetric algorithms: a JWKS is public, so an HMAC key in it would let anyone sign.
ALGORITHMS = frozenset({"RS256", "ES256"})


class KeysUnavailable(Exception):
    """The JWKS could not be fetched and no earlier copy is cached: no token can be checked."""


class UnknownKey(Exception):
    """The token names a key the issuer does not publish (or a kind of key we do not accept)."""


class JwksCache:
    """The JWKS as last fetched. An unknown key id refetches it at once, because the issuer may just
    have rotated, but at most once per `min_refresh_seconds`: forged key ids must not turn every
    request into a fetch. A failed fetch keeps serving the keys it already has."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, cache_seconds: float, min_refresh_seconds: float
    ) -> None:
        self._session = session
        self._url = url
        self._cache_seconds = cache_seconds
        self._min_refresh_seconds = min_refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, key_id: str | None) -> jwt.PyJWK:
        if self._should_refresh(key_id):
            await self._refresh(seen=self._fetched_at)
        if not self._keys:
            raise KeysUnavailable(f"no signing keys could be fetched from {self._url}")
        if key_id is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(key_id or "")
        if found is None:
            raise UnknownKey("the token's key id (kid) is not among the issuer's keys")
        return found

    def _should_refresh(self, key_id: str | None) -> bool:
        age = time.monotonic() - self._fetched_at
        if age > self._cache_seconds:
            return True
        missing = not self._keys or (key_id is not None and key_id not in self._keys)
        return missing and age >= self._min_refresh_seconds

    async def _refresh(self, *, seen: float) -> None:
        async with self._lock:
            if self._fetched_at != seen:  # another request refreshed while this one waited
                return
            try:
                self._keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError) as exc:
                log.warning("could not fetch the JWKS from %s: %r", self._url, exc)
            finally:
                self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        async with self._session.get(self._url, timeout=timeout) as response:
            response.raise_for_status()
            document = await response.json(content_type=None)
        keys = jwt.PyJWKSet.from_dict(document).keys
        usable = {key.key_id or "": key for key in keys if key.algorithm_name in ALGORITHMS}
        log.info("fetched %d signing key(s) from %s", len(usable), self._url)
        return usable

"""The Redis tier: one key per id holding an orjson payload, shared by every proxy replica.

Redis is a cache here, never a source of truth: every failure (refused, timeout, pool exhausted,
garbage payload) reads as a miss, and after one the store stays out of the way for
`redis_backoff` seconds instead of making each request wait for a timeout.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import Config
from .storage import Entry

log = logging.getLogger("proxy_service.store")

MISSING: Final = "missing"
_FIELDS = ("key", "url", "head_url", "expires_at", "signed_at")


def dumps(entry: Entry) -> bytes:
    return orjson.dumps(
        {
            "key": entry.key,
            "url": entry.url,
            "head_url": entry.head_url,
            "expires_at": entry.expires_at,
            "signed_at": entry.signed_at,
        }
    )


def loads(raw: bytes) -> Entry | str | None:
    """An `Entry`, `MISSING` for a negative entry, or None for anything unreadable."""
    try:
        data = orjson.loads(raw)
        if data.get(MISSING) is True:
            return MISSING
        key, url, head_url, expires_at, signed_at = (data[f] for f in _FIELDS)
        if not (isinstance(key, str) and isinstance(url, str) and isinstance(head_url, str)):
            return None
        return Entry(key, url, head_url, float(expires_at), float(signed_at))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


class RedisStore:
    def __init__(self, config: Config) -> None:
        t = config.redis_timeout
        pool = BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=64,
            timeout=t,
            socket_timeout=t,
            socket_connect_timeout=t,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis(connection_pool=pool)
        self._prefix = config.redis_prefix
        self._backoff = config.redis_backoff
        self._down_until = 0.0
        self.errors = 0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def key(self, image_id: str) -> str:
        return f"{self._prefix}url:{image_id}"

    async def get(self, image_id: str) -> Entry | str | None:
        if not self.up:
            return None
        try:
            raw = await self._redis.get(self.key(image_id))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        value = loads(raw if isinstance(raw, bytes) else raw.encode())
        if value is None:
            log.warning("unreadable cache payload", extra={"image_id": image_id})
        return value

    async def put(self, image_id: str, entry: Entry, ttl: float) -> None:
        await self._set(image_id, dumps(entry), ttl)

    async def put_missing(self, image_id: str, ttl: float) -> None:
        await self._set(image_id, b'{"missing":true}', ttl)

    async def delete(self, image_id: str) -> None:
        if self.up:
            try:
                await self._redis.delete(self.key(image_id))
            except (RedisError, OSError) as exc:
                self._failed(exc)

    async def ping(self) -> bool:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._down_until = 0.0
        return True

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    async def _set(self, image_id: str, payload: bytes, ttl: float) -> None:
        millis = int(ttl * 1000)
        if millis <= 0 or not self.up:
            return
        try:
            await self._redis.set(self.key(image_id), payload, px=millis)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.up:
            # Only the exception's type: redis-py messages can carry the URL with its password.
            log.warning("redis unavailable (%s); serving without it", type(exc).__name__)
        self._down_until = time.monotonic() + self._backoff

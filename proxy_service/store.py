"""The Redis tier: one key per id holding an orjson payload, shared by every proxy replica.

Redis is a cache here, never a source of truth: every failure (refused, timeout, pool exhausted,
garbage payload) reads as a miss, and after one the store stays out of the way for
`redis_backoff` seconds instead of making each request wait for a timeout.

Keys (prefix `ps:` by default); the index keys share the hash tag `{idx}`, so the scripts that
touch both are Redis-Cluster-safe, while payloads spread over the cluster:
- `<prefix>url:<id>`      the payload, with a TTL equal to the URL's remaining life;
- `<prefix>{idx}:due`     sorted set id -> when the refresher should next look at it;
- `<prefix>{idx}:seen`    sorted set id -> last access, written in batches by the proxies;
- `<prefix>purge`         pub/sub channel of purged ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Final

import orjson
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from . import metrics
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


Client = Redis | RedisCluster


def connect(config: Config, timeout: float | None) -> Client:
    """A client with short timeouts and no retries: callers decide what a failure means."""
    if config.redis_cluster:
        return RedisCluster.from_url(
            config.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout or config.redis_timeout,
            retry=Retry(NoBackoff(), 0),
        )
    pool = BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=128,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout or config.redis_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis(connection_pool=pool)


async def close(client: Client) -> None:
    await client.aclose()
    if isinstance(client, Redis):
        await client.connection_pool.disconnect()


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.due = f"{prefix}{{idx}}:due"
        self.seen = f"{prefix}{{idx}}:seen"
        self.purge = f"{prefix}purge"

    def url(self, image_id: str) -> str:
        return f"{self.prefix}url:{image_id}"


class RedisStore:
    """The hot path's view of Redis: never raises, and steps aside after a failure."""

    def __init__(self, config: Config) -> None:
        self._redis = connect(config, config.redis_timeout)
        self.keys = Keys(config.redis_prefix)
        self._refresh_before = config.refresh_before
        self._backoff = config.redis_backoff
        self._down_until = 0.0
        self.errors = 0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def get(self, image_id: str) -> Entry | str | None:
        if not self.up:
            return None
        try:
            raw = await self._redis.get(self.keys.url(image_id))
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
        """Store a freshly signed entry and enter it in the refresher's index."""
        millis = int(ttl * 1000)
        if millis <= 0 or not self.up:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.url(image_id), dumps(entry), px=millis)
                pipe.zadd(self.keys.due, {image_id: entry.expires_at - self._refresh_before})
                pipe.zadd(self.keys.seen, {image_id: entry.signed_at})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def touch(self, image_ids: Collection[str], now: float) -> None:
        """Record that these ids were served (batched: the refresher keeps only the hot set)."""
        if not image_ids or not self.up:
            return
        try:
            # XX: only ids still indexed; a purged or retired id must not reappear here.
            await self._redis.zadd(self.keys.seen, dict.fromkeys(image_ids, now), xx=True)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def put_missing(self, image_id: str, ttl: float) -> None:
        millis = int(ttl * 1000)
        if millis <= 0 or not self.up:
            return
        try:
            await self._redis.set(self.keys.url(image_id), b'{"missing":true}', px=millis)
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def delete(self, image_id: str) -> None:
        if self.up:
            try:
                await self._redis.delete(self.keys.url(image_id))
            except (RedisError, OSError) as exc:
                self._failed(exc)

    async def ping(self) -> bool:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._down_until = 0.0
        metrics.REDIS_UP.set(1)
        return True

    async def aclose(self) -> None:
        await close(self._redis)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        metrics.REDIS_ERRORS.inc()
        metrics.REDIS_UP.set(0)
        if self.up:
            # Only the exception's type: redis-py messages can carry the URL with its password.
            log.warning("redis unavailable (%s); serving without it", type(exc).__name__)
        self._down_until = time.monotonic() + self._backoff

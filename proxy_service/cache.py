"""id -> Entry through the tiers: in-process LRU, then Redis, then resolve and sign.

- The LRU never serves an entry within `expiry_margin` of its URL's expiry, nor longer than
  `lru_ttl` after it was stored, which bounds how stale a purged or replaced entry can be.
- Concurrent misses for one id in this process share one resolution (single-flight).
- Unknown ids are remembered as negative entries for `negative_ttl`.
- A read never writes to Redis; only a resolution (a miss) does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from typing import Literal

from . import metrics
from .config import Config
from .errors import NotFound
from .resolvers import Resolver, check_key
from .storage import Entry, Signer
from .store import MISSING, RedisStore

Tier = Literal["local", "redis", "miss"]

# Counted once per lookup that reached the tier (waiters on a shared miss are not recounted),
# in plain ints handed to prometheus-client every second (see metrics.Tally).
_LOCAL_HIT = metrics.Tally(metrics.URL_CACHE.labels("local_hit"))
_REDIS_HIT = metrics.Tally(metrics.URL_CACHE.labels("redis_hit"))
_MISS = metrics.Tally(metrics.URL_CACHE.labels("miss"))
_NEGATIVE_HIT = metrics.Tally(metrics.URL_CACHE.labels("negative_hit"))


class UrlCache:
    def __init__(
        self, config: Config, resolver: Resolver, signer: Signer, store: RedisStore | None
    ) -> None:
        self._resolver = resolver
        self._signer = signer
        self._store = store
        self._prefix = config.key_prefix
        self._margin = config.expiry_margin
        self._lru_size = config.lru_size
        self._lru_ttl = config.lru_ttl
        self._negative_ttl = config.negative_ttl
        # id -> (entry or None for "unknown id", serve until)
        self._lru: OrderedDict[str, tuple[Entry | None, float]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[tuple[Entry, Tier]]] = {}
        # Ids served since the last flush: the refresher's hot set, recorded without a Redis
        # write per hit (the store keeps none of this when Redis is not configured).
        self._touched: set[str] = set()
        self._track = store is not None
        self.signings = 0

    async def get(self, image_id: str, now: float, avoid: str = "") -> tuple[Entry, Tier]:
        """The entry for `image_id` and the tier that answered; raises `NotFound`.

        `avoid` is a URL the origin just refused: a tier holding it is skipped, so it is re-signed.
        """
        item = self._lru.get(image_id)
        if item is not None:
            entry, until = item
            if now < until and not (avoid and entry is not None and entry.url == avoid):
                self._lru.move_to_end(image_id)
                if entry is None:
                    _NEGATIVE_HIT.inc()
                    raise NotFound()
                _LOCAL_HIT.inc()
                if self._track:
                    self._touched.add(image_id)
                return entry, "local"
            del self._lru[image_id]
        flight = (image_id, avoid)
        task = self._inflight.get(flight)
        if task is None:
            task = asyncio.ensure_future(self._load(image_id, now, avoid))
            self._inflight[flight] = task
            task.add_done_callback(lambda _: self._inflight.pop(flight, None))
        # Shielded: a client that goes away must not cancel the resolution others wait for.
        return await asyncio.shield(task)

    def for_method(self, entry: Entry, method: str, now: float) -> Entry:
        """The entry with a URL for `method`: HEAD URLs are signed on demand, never cached."""
        if method != "HEAD" or entry.head_url:
            return entry
        return dataclasses.replace(entry, head_url=self._signer.head_url(entry, now))

    def take_touched(self) -> set[str]:
        touched, self._touched = self._touched, set()
        return touched

    def drop_local(self, image_id: str) -> None:
        self._lru.pop(image_id, None)

    def clear_local(self) -> None:
        self._lru.clear()

    async def forget(self, image_id: str) -> None:
        """Drop every tier's entry for the id (used on purge)."""
        self._lru.pop(image_id, None)
        if self._store is not None:
            await self._store.delete(image_id)

    async def mark_missing(self, image_id: str, now: float) -> None:
        """Remember that the origin does not have this id."""
        if self._negative_ttl <= 0:
            self._lru.pop(image_id, None)
            return
        self._remember(image_id, None, now + self._negative_ttl)
        if self._store is not None:
            await self._store.put_missing(image_id, self._negative_ttl)

    def __len__(self) -> int:
        return len(self._lru)

    async def _load(self, image_id: str, now: float, avoid: str) -> tuple[Entry, Tier]:
        if self._store is not None:
            cached = await self._store.get(image_id)
            if cached == MISSING:
                _NEGATIVE_HIT.inc()
                self._remember(image_id, None, now + self._negative_ttl)
                raise NotFound()
            if isinstance(cached, Entry) and not (avoid and cached.url == avoid):
                serve_until = cached.expires_at - self._margin
                if now < serve_until:
                    self._remember(image_id, cached, min(serve_until, now + self._lru_ttl))
                    self._touched.add(image_id)
                    _REDIS_HIT.inc()
                    return cached, "redis"
        try:
            key = check_key(await self._resolver.resolve(image_id), self._prefix)
        except NotFound:
            await self.mark_missing(image_id, now)
            raise
        entry = self._signer.sign(key, now)
        self.signings += 1
        _MISS.inc()
        metrics.SIGNINGS.inc()
        serve_until = entry.expires_at - self._margin
        self._remember(image_id, entry, min(serve_until, now + self._lru_ttl))
        if self._store is not None:
            await self._store.put(image_id, entry, entry.expires_at - now)
        return entry, "miss"

    def _remember(self, image_id: str, entry: Entry | None, until: float) -> None:
        if self._lru_size <= 0:
            return
        self._lru[image_id] = (entry, until)
        self._lru.move_to_end(image_id)
        while len(self._lru) > self._lru_size:
            self._lru.popitem(last=False)

"""The refresher's side of Redis: the expiry index, atomic claims with a lease, retirement, purge.

Nothing leaves the `due` set until it is re-signed (its score moves to the new URL's refresh time)
or retired. A claim does not remove an id either: it pushes its score to `now + lease`, atomically,
so a worker that dies mid-batch leaves its ids to come due again once the lease runs out, and
replicas claiming at the same time never get the same id. Unlike the hot path's store, every call
here raises on a Redis failure: the worker loop decides what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.commands.core import AsyncScript

from .config import Config
from .storage import Entry
from .store import Client, Keys, close, connect, dumps

# KEYS: due. ARGV: now, lease_until, limit.
_CLAIM = """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""
# KEYS: due, seen. ARGV: id, idle_cutoff. Retire only if still idle (a proxy may have just used it).
_RETIRE_IF_IDLE = """
local seen = redis.call('ZSCORE', KEYS[2], ARGV[1])
if seen and tonumber(seen) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class Index:
    def __init__(self, config: Config) -> None:
        self._redis: Client = connect(config, max(config.redis_timeout, 1.0))
        self.keys = Keys(config.redis_prefix)
        self._refresh_before = config.refresh_before
        self._claim: AsyncScript = self._redis.register_script(_CLAIM)
        self._retire: AsyncScript = self._redis.register_script(_RETIRE_IF_IDLE)

    async def aclose(self) -> None:
        await close(self._redis)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def claim(self, now: float, lease: float, limit: int) -> list[str]:
        ids = await self._claim(keys=[self.keys.due], args=[now, now + lease, limit])
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def lag(self, now: float) -> float:
        """How late the most overdue id is (0 when nothing is overdue)."""
        first = await self._redis.zrange(self.keys.due, 0, 0, withscores=True)
        return max(0.0, now - float(first[0][1])) if first else 0.0

    async def size(self) -> int:
        return int(await self._redis.zcard(self.keys.due))

    async def retire_if_idle(self, image_id: str, cutoff: float) -> bool:
        return bool(
            await self._retire(keys=[self.keys.due, self.keys.seen], args=[image_id, cutoff])
        )

    async def store(self, image_id: str, entry: Entry, now: float, force: bool = False) -> bool:
        """Write a re-signed entry; False (and nothing left behind) if the id was purged
        meanwhile, unless `force` (an explicit refresh) puts it back in the index.

        Payload first, index second: if the payload write fails the id stays leased and comes due
        again. A purge removes the index entry before the payload, so whichever order the two
        interleave in, a purged id never keeps a payload written by a refresh."""
        await self._redis.set(
            self.keys.url(image_id), dumps(entry), px=int((entry.expires_at - now) * 1000)
        )
        due = entry.expires_at - self._refresh_before
        if force:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.due, {image_id: due})
                pipe.zadd(self.keys.seen, {image_id: now})
                await pipe.execute()
            return True
        updated = await self._redis.zadd(self.keys.due, {image_id: due}, xx=True, ch=True)
        if not updated and await self._redis.zscore(self.keys.due, image_id) is None:
            await self._redis.delete(self.keys.url(image_id))
            return False
        return True

    async def release(self, image_ids: Sequence[str], now: float) -> None:
        """Hand claimed ids back at once (graceful shutdown), instead of waiting for the lease."""
        if image_ids:
            await self._redis.zadd(self.keys.due, dict.fromkeys(image_ids, now), xx=True)

    async def purge(self, image_id: str) -> None:
        """Forget the id everywhere: payload, index, and every proxy's LRU (via pub/sub)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.due, image_id)
            pipe.zrem(self.keys.seen, image_id)
            await pipe.execute()
        await self._redis.delete(self.keys.url(image_id))  # after the index: see `store`
        await self.announce(image_id)

    async def announce(self, image_id: str) -> None:
        """Tell every proxy to drop its LRU entry for the id."""
        await self._redis.publish(self.keys.purge, image_id)

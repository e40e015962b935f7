"""What keeps one proxy process in step with the rest through Redis, off the hot path:

- every `access_flush_interval` seconds, the ids it served go to the refresher's `seen` set in
  one write (the refresher keeps only ids somebody still asks for);
- purge messages drop ids from its LRU. A message missed while disconnected is covered twice:
  the LRU never holds an entry longer than `lru_ttl`, and the LRU is cleared on every resubscribe.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from .cache import UrlCache
from .config import Config
from .objects import ObjectCache
from .store import Keys, RedisStore

log = logging.getLogger("proxy_service.sync")


async def flush_access(config: Config, cache: UrlCache, store: RedisStore) -> None:
    while True:
        # A cancel swallowed by redis-py (see app.py) lands here at the latest.
        await asyncio.sleep(config.access_flush_interval)
        touched = cache.take_touched()
        if touched:
            await store.touch(touched, time.time())


async def listen_purges(
    config: Config, cache: UrlCache, objects: ObjectCache | None = None
) -> None:
    channel = Keys(config.redis_prefix).purge
    # A subscriber blocks on reads: no socket timeout. A plain connection to one node also serves
    # a Redis Cluster, where PUBLISH reaches every node's subscribers.
    client = Redis.from_url(config.redis_url, socket_connect_timeout=config.redis_timeout)
    first = True
    try:
        while True:
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    if not first:
                        cache.clear_local()  # purges sent while we were away are unknown
                        if objects is not None:
                            objects.clear()
                    first = False
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message["type"] == "message":
                            data = message["data"]
                            image_id = data.decode() if isinstance(data, bytes) else data
                            cache.drop_local(image_id)
                            if objects is not None:
                                objects.drop(image_id)
            except Exception as exc:  # the listener must outlive any failure: it only retries
                log.warning("purge channel lost (%s); reconnecting", type(exc).__name__)
                first = False
                await asyncio.sleep(config.redis_backoff or 1.0)
    finally:
        await client.aclose()

"""`Index` (the refresher's side of Redis) against a real Redis: claims and their lease, release,
retirement, re-signed writes, purge and its announcement, lag and size."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import redis

from proxy_service.config import Config
from proxy_service.index import Index
from proxy_service.storage import Entry
from proxy_service.store import Keys, RedisStore, close, connect, loads

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_config(prefix: str, **changes: Any) -> Config:
    # A generous timeout: the shared server may be busy with other tests.
    base: dict[str, Any] = {"redis_url": REDIS_URL, "redis_prefix": prefix, "redis_timeout": 2.0}
    base.update(changes)
    config = Config(**base)
    config.validate()
    return config


def entry_due_at(
    config: Config, image_id: str, due_at: float, signed_at: float | None = None
) -> Entry:
    """An entry whose refresh time (expires_at - refresh_before) is `due_at`."""
    expires_at = due_at + config.refresh_before
    return Entry(
        key=f"images/{image_id}",
        url=f"https://cos.test/images/{image_id}?sig=old",
        head_url=f"https://cos.test/images/{image_id}?h=old",
        expires_at=expires_at,
        signed_at=expires_at - config.sign_expires if signed_at is None else signed_at,
    )


async def seed(
    config: Config, ids: Iterable[str], due_at: float, signed_at: float | None = None
) -> None:
    """Enter ids the way a proxy does after a signing: `RedisStore.put`."""
    store = RedisStore(config)
    try:
        now = time.time()
        for image_id in ids:
            entry = entry_due_at(config, image_id, due_at, signed_at)
            await store.put(image_id, entry, entry.expires_at - now)
        assert store.errors == 0
    finally:
        await store.aclose()


def with_index(config: Config, body: Callable[[Index], Awaitable[None]]) -> None:
    async def main() -> None:
        index = Index(config)
        try:
            await body(index)
        finally:
            await index.aclose()

    asyncio.run(main())


def due_scores(config: Config) -> dict[str, float]:
    with redis.Redis.from_url(REDIS_URL) as client:
        pairs = client.zrange(Keys(config.redis_prefix).due, 0, -1, withscores=True)
    return {member.decode(): score for member, score in pairs}


def seen_scores(config: Config) -> dict[str, float]:
    with redis.Redis.from_url(REDIS_URL) as client:
        pairs = client.zrange(Keys(config.redis_prefix).seen, 0, -1, withscores=True)
    return {member.decode(): score for member, score in pairs}


def payload(config: Config, image_id: str) -> bytes | None:
    with redis.Redis.from_url(REDIS_URL) as client:
        raw = client.get(Keys(config.redis_prefix).url(image_id))
    assert raw is None or isinstance(raw, bytes)
    return raw


def test_claim_takes_due_ids_up_to_limit_and_leases_them(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        for n in range(5):
            await seed(config, [f"due{n}.png"], now - 50 + n)  # due0 is the most overdue
        await seed(config, ["later1.png", "later2.png"], now + 100)

        first = await index.claim(now, lease=30, limit=3)
        assert first == ["due0.png", "due1.png", "due2.png"]  # the most overdue first
        scores = due_scores(config)
        for image_id in first:
            assert scores[image_id] == pytest.approx(now + 30)
        assert scores["due3.png"] == pytest.approx(now - 47)  # not claimed: untouched
        assert scores["later1.png"] == pytest.approx(now + 100)

        assert sorted(await index.claim(now, lease=30, limit=3)) == ["due3.png", "due4.png"]
        assert await index.claim(now, lease=30, limit=3) == []  # nothing else is due
        assert await index.size() == 7  # a claim removes nothing from the index

    with_index(config, body)


def test_concurrent_claims_never_return_an_id_twice(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    ids = [f"img{n}.png" for n in range(600)]
    now = time.time()

    async def main() -> None:
        await seed(config, ids, now - 10)
        indexes = [Index(config) for _ in range(4)]  # four replicas, four clients
        try:

            async def worker(index: Index) -> list[str]:
                got: list[str] = []
                while batch := await index.claim(time.time(), lease=60, limit=7):
                    got += batch
                return got

            results = await asyncio.gather(*(worker(i) for i in indexes for _ in range(3)))
        finally:
            for index in indexes:
                await index.aclose()
        claimed = [image_id for batch in results for image_id in batch]
        assert len(claimed) == len(ids)
        assert sorted(claimed) == sorted(ids)  # every id exactly once
        assert sum(1 for batch in results if batch) > 1  # the claims really ran side by side

    asyncio.run(main())


def test_unreleased_claim_comes_due_again_after_the_lease(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        await seed(config, ["a.png", "b.png"], now - 5)
        assert sorted(await index.claim(now, lease=20, limit=10)) == ["a.png", "b.png"]
        # The worker died: nobody stores or releases. Until the lease runs out, nobody gets them...
        assert await index.claim(now + 19.9, lease=20, limit=10) == []
        # ... and then the next claim does.
        assert sorted(await index.claim(now + 20.1, lease=20, limit=10)) == ["a.png", "b.png"]
        # Real time too: a short lease, then wait it out.
        await seed(config, ["c.png"], time.time() - 1)
        assert await index.claim(time.time(), lease=0.2, limit=10) == ["c.png"]
        assert await index.claim(time.time(), lease=0.2, limit=10) == []
        await asyncio.sleep(0.3)
        assert await index.claim(time.time(), lease=0.2, limit=10) == ["c.png"]

    with_index(config, body)


def test_release_makes_claimed_ids_due_at_once(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        await seed(config, ["a.png", "b.png", "c.png"], now - 5)
        claimed = await index.claim(now, lease=600, limit=10)
        assert len(claimed) == 3
        await index.release(["a.png", "c.png"], time.time())
        assert sorted(await index.claim(time.time(), lease=600, limit=10)) == ["a.png", "c.png"]
        # Releasing an id that is not in the index (retired, purged) does not bring it back.
        await index.release(["ghost.png"], time.time())
        assert "ghost.png" not in due_scores(config)
        await index.release([], time.time())  # a no-op

    with_index(config, body)


def test_retire_if_idle_removes_only_idle_ids(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    keys = Keys(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        await seed(config, ["hot.png", "idle.png", "unseen.png"], now - 5, signed_at=now - 5000)
        store = RedisStore(config)
        try:
            await store.touch(["hot.png"], now - 10)  # a proxy served it 10 s ago
        finally:
            await store.aclose()
        with redis.Redis.from_url(REDIS_URL) as client:
            client.zrem(keys.seen, "unseen.png")  # no access record at all counts as idle

        cutoff = now - 3600
        assert not await index.retire_if_idle("hot.png", cutoff)
        assert await index.retire_if_idle("idle.png", cutoff)
        assert await index.retire_if_idle("unseen.png", cutoff)
        assert set(due_scores(config)) == {"hot.png"}
        assert set(seen_scores(config)) == {"hot.png"}
        # Retiring leaves the payload alone: proxies keep using it until its TTL ends.
        assert payload(config, "idle.png") is not None
        # A seen time exactly at the cutoff is recent enough.
        await seed(config, ["edge.png"], now - 5, signed_at=cutoff)
        assert not await index.retire_if_idle("edge.png", cutoff)

    with_index(config, body)


def test_store_writes_payload_and_next_refresh_time(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        await seed(config, ["cat.png"], now - 5, signed_at=now - 1000)
        seen_before = seen_scores(config)["cat.png"]
        fresh = Entry("images/cat.png", "https://new/get", "https://new/head", now + 3600, now)
        assert await index.store("cat.png", fresh, now)
        raw = payload(config, "cat.png")
        assert raw is not None
        assert loads(raw) == fresh
        assert due_scores(config)["cat.png"] == pytest.approx(now + 3600 - config.refresh_before)
        assert seen_scores(config)["cat.png"] == seen_before  # a refresh is not an access
        with redis.Redis.from_url(REDIS_URL) as client:
            ttl = client.pttl(Keys(redis_prefix).url("cat.png"))
        assert isinstance(ttl, int)
        assert 3590_000 < ttl <= 3600_000

    with_index(config, body)


def test_store_of_a_purged_id_writes_nothing_unless_forced(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        await seed(config, ["gone.png"], now - 5)
        await index.purge("gone.png")
        fresh = Entry("images/gone.png", "https://new/get", "https://new/head", now + 3600, now)
        assert not await index.store("gone.png", fresh, now)
        assert payload(config, "gone.png") is None
        assert "gone.png" not in due_scores(config)
        assert "gone.png" not in seen_scores(config)
        # An explicit refresh puts it back: payload, refresh time and an access record.
        assert await index.store("gone.png", fresh, now, force=True)
        raw = payload(config, "gone.png")
        assert raw is not None
        assert loads(raw) == fresh
        assert due_scores(config)["gone.png"] == pytest.approx(now + 3600 - config.refresh_before)
        assert seen_scores(config)["gone.png"] == pytest.approx(now)
        # Forcing the same entry again is fine too (the score does not change).
        assert await index.store("gone.png", fresh, now, force=True)

    with_index(config, body)


def test_purge_deletes_everything_and_announces_the_id(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    keys = Keys(redis_prefix)
    now = time.time()

    async def main() -> None:
        await seed(config, ["cat.png", "dog.png"], now - 5)
        listener = connect(config, 5.0)
        index = Index(config)
        try:
            async with listener.pubsub() as pubsub:
                await pubsub.subscribe(keys.purge)
                await index.purge("cat.png")
                message = None
                deadline = time.monotonic() + 5
                while message is None and time.monotonic() < deadline:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                assert message is not None
                assert message["type"] == "message"
                assert message["channel"] == keys.purge.encode()
                assert message["data"] == b"cat.png"
        finally:
            await index.aclose()
            await close(listener)
        assert payload(config, "cat.png") is None
        assert set(due_scores(config)) == {"dog.png"}
        assert set(seen_scores(config)) == {"dog.png"}
        assert payload(config, "dog.png") is not None

    asyncio.run(main())


def test_lag_and_size(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()

    async def body(index: Index) -> None:
        assert await index.lag(now) == 0.0
        assert await index.size() == 0
        await seed(config, ["old.png"], now - 30)
        await seed(config, ["new.png"], now - 5)
        await seed(config, ["later.png"], now + 100)
        assert await index.lag(now) == pytest.approx(30)
        assert await index.size() == 3
        await index.claim(now, lease=60, limit=100)
        assert await index.lag(now) == 0.0  # claimed ids are not late, they are leased
        assert await index.lag(now + 200) == pytest.approx(140)  # the lease ran out 140 s ago
        assert await index.size() == 3
        assert await index.ping()

    with_index(config, body)


def test_purge_racing_a_store_leaves_no_payload(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: Index.store used to check the index, then write the payload, so a purge in
    # between left a fresh payload behind. Now: payload, then ZADD XX (undone if purged).
    config = make_config(redis_prefix)
    now = time.time()

    async def main() -> None:
        await seed(config, ["cat.png"], now - 5)
        refresher, admin = Index(config), Index(config)
        try:
            real_set = refresher._redis.set

            async def set_after_a_purge(*args: Any, **kwargs: Any) -> Any:
                # `proxy-service purge cat.png` runs while the refresher is between its writes.
                await admin.purge("cat.png")
                return await real_set(*args, **kwargs)

            monkeypatch.setattr(refresher._redis, "set", set_after_a_purge)
            fresh = Entry("images/cat.png", "https://new/get", "https://new/head", now + 3600, now)
            await refresher.store("cat.png", fresh, now)
        finally:
            await refresher.aclose()
            await admin.aclose()
        assert "cat.png" not in due_scores(config)
        assert payload(config, "cat.png") is None

    asyncio.run(main())

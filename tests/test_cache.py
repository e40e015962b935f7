"""`UrlCache` against a real Redis: the tiers, expiry, single-flight and negative caching."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import redis

from proxy_service.cache import UrlCache
from proxy_service.config import Config
from proxy_service.errors import BadId, NotFound
from proxy_service.storage import Entry
from proxy_service.storage.local import LocalSigner
from proxy_service.store import MISSING, RedisStore, loads
from tests.support.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = 1_700_000_000.0
_SIGNATURES = itertools.count(1)  # unique URLs across every signer of the test run


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
def raw(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    return private_redis


class FakeResolver:
    """`images/<id>`, counting calls; ids in `missing` raise NotFound; `keys` overrides."""

    def __init__(
        self,
        delay: float = 0.0,
        missing: Iterable[str] = (),
        keys: dict[str, str] | None = None,
    ) -> None:
        self.delay = delay
        self.missing = set(missing)
        self.keys = keys or {}
        self.calls: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.finished = 0

    async def resolve(self, image_id: str) -> str:
        self.calls[image_id] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if image_id in self.missing:
                raise NotFound()
            return self.keys.get(image_id, f"images/{image_id}")
        finally:
            self.active -= 1
            self.finished += 1

    async def aclose(self) -> None:
        return None

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class CountingSigner:
    """The real `LocalSigner`, with a unique URL per signing (LocalSigner's is empty)."""

    def __init__(self, config: Config, expires: float | None = None) -> None:
        self._inner = LocalSigner(config)
        self._expires = expires
        self.calls: list[tuple[str, float]] = []

    def sign(self, key: str, now: float) -> Entry:
        self.calls.append((key, now))
        entry = self._inner.sign(key, now)
        n = next(_SIGNATURES)
        entry = dataclasses.replace(
            entry, url=f"https://cos.test/{key}?sig={n}", head_url=f"https://cos.test/{key}?h={n}"
        )
        if self._expires is not None:
            entry = dataclasses.replace(entry, expires_at=now + self._expires)
        return entry

    def head_url(self, entry: Entry, now: float) -> str:
        return entry.url.replace("?sig=", "?h=")


def make_config(prefix: str = "p:", url: str = REDIS_URL, **changes: Any) -> Config:
    # A generous timeout by default: the shared server may be busy with other tests, and a
    # spurious timeout would turn an expected "redis" hit into a "miss".
    base: dict[str, Any] = {"redis_url": url, "redis_prefix": prefix, "redis_timeout": 2.0}
    base.update(changes)
    config = Config(**base)
    config.validate()
    return config


class Node:
    """One proxy process's view: a cache with its own LRU, resolver and signer."""

    def __init__(
        self,
        config: Config,
        store: RedisStore | None,
        resolver: FakeResolver | None = None,
        signer: CountingSigner | None = None,
    ) -> None:
        self.resolver = resolver or FakeResolver()
        self.signer = signer or CountingSigner(config)
        self.store = store
        self.cache = UrlCache(config, self.resolver, self.signer, store)

    async def get(self, image_id: str, now: float, avoid: str = "") -> tuple[Entry, str]:
        return await self.cache.get(image_id, now, avoid)


def run_nodes(
    config: Config, count: int, body: Callable[..., Awaitable[None]], **node_args: Any
) -> None:
    """`body(*nodes)`: `count` caches, each with its own RedisStore on `config`, closed after."""

    async def main() -> None:
        stores = [RedisStore(config) for _ in range(count)]
        try:
            await body(*(Node(config, s, **node_args) for s in stores))
        finally:
            for s in stores:
                await s.aclose()

    asyncio.run(main())


def stored(raw: redis.Redis, prefix: str, image_id: str) -> Entry | str | None:
    payload = raw.get(f"{prefix}url:{image_id}")
    assert payload is None or isinstance(payload, bytes)
    return None if payload is None else loads(payload)


# -- tiers ------------------------------------------------------------------------------------


def test_miss_then_local_and_written_to_redis(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(node: Node) -> None:
        entry, tier = await node.get("cat", T0)
        assert tier == "miss"
        assert entry.key == "images/cat"
        assert entry.signed_at == T0
        assert entry.expires_at == T0 + config.sign_expires
        assert node.signer.calls == [("images/cat", T0)]
        assert node.cache.signings == 1
        assert node.resolver.calls == {"cat": 1}

        again, tier = await node.get("cat", T0 + 1)
        assert (again, tier) == (entry, "local")
        assert node.cache.signings == 1
        assert node.resolver.total == 1
        assert len(node.cache) == 1

        assert stored(raw, prefix, "cat") == entry
        assert 3_590_000 < raw.pttl(f"{prefix}url:cat") <= 3_600_000

    run_nodes(config, 1, body)


def test_second_instance_reads_redis_then_local(prefix: str) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node) -> None:
        entry, tier = await a.get("cat", T0)
        assert tier == "miss"

        got, tier = await b.get("cat", T0 + 5)
        assert (got, tier) == (entry, "redis")
        got, tier = await b.get("cat", T0 + 6)
        assert (got, tier) == (entry, "local")
        assert b.resolver.total == 0
        assert b.signer.calls == []
        assert b.cache.signings == 0

    run_nodes(config, 2, body)


def test_a_read_from_redis_does_not_write_back(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node) -> None:
        await a.get("cat", T0)
        raw.pexpire(f"{prefix}url:cat", 50_000)
        await b.get("cat", T0 + 5)
        assert 40_000 < raw.pttl(f"{prefix}url:cat") <= 50_000

    run_nodes(config, 2, body)


def test_without_a_store_the_lru_alone_serves() -> None:
    config = make_config(url="")

    async def main() -> None:
        node = Node(config, None)
        entry, tier = await node.get("cat", T0)
        assert tier == "miss"
        assert await node.get("cat", T0 + 1) == (entry, "local")
        other, tier = await node.get("dog", T0 + 2)
        assert tier == "miss"
        assert other.key == "images/dog"
        assert node.cache.signings == 2
        await node.cache.forget("cat")
        assert (await node.get("cat", T0 + 3))[1] == "miss"
        await node.cache.mark_missing("dog", T0 + 4)
        with pytest.raises(NotFound):
            await node.get("dog", T0 + 5)

    asyncio.run(main())


def test_lru_is_bounded_and_evicts_least_recently_used() -> None:
    config = make_config(url="", lru_size=2)

    async def main() -> None:
        node = Node(config, None)
        await node.get("a", T0)
        await node.get("b", T0)
        assert (await node.get("a", T0 + 1))[1] == "local"  # a is now the most recent
        await node.get("c", T0 + 2)  # evicts b
        assert len(node.cache) == 2
        assert (await node.get("a", T0 + 3))[1] == "local"
        assert (await node.get("c", T0 + 3))[1] == "local"
        assert (await node.get("b", T0 + 4))[1] == "miss"  # evicts a
        assert (await node.get("a", T0 + 5))[1] == "miss"
        assert len(node.cache) == 2
        assert node.resolver.calls == {"a": 2, "b": 2, "c": 1}

    asyncio.run(main())


def test_lru_size_zero_disables_the_lru(prefix: str) -> None:
    config = make_config(prefix, lru_size=0)

    async def body(node: Node) -> None:
        assert (await node.get("cat", T0))[1] == "miss"
        assert (await node.get("cat", T0 + 1))[1] == "redis"
        assert (await node.get("cat", T0 + 2))[1] == "redis"
        assert len(node.cache) == 0
        assert node.cache.signings == 1

    run_nodes(config, 1, body)


def test_evicted_entry_comes_back_from_redis(prefix: str) -> None:
    config = make_config(prefix, lru_size=1)

    async def body(node: Node) -> None:
        entry, _ = await node.get("a", T0)
        await node.get("b", T0)
        assert await node.get("a", T0 + 1) == (entry, "redis")
        assert node.cache.signings == 2

    run_nodes(config, 1, body)


# -- expiry -----------------------------------------------------------------------------------


def test_lru_stops_serving_within_expiry_margin() -> None:
    # lru_ttl is long, so only the margin limits the LRU.
    config = make_config(url="", sign_expires=3600, expiry_margin=300, lru_ttl=100_000)

    async def main() -> None:
        node = Node(config, None)
        first, _ = await node.get("cat", T0)
        assert await node.get("cat", T0 + 3299.5) == (first, "local")
        second, tier = await node.get("cat", T0 + 3300)
        assert tier == "miss"
        assert second != first
        assert second.signed_at == T0 + 3300
        assert second.expires_at == T0 + 3300 + 3600
        assert node.cache.signings == 2

    asyncio.run(main())


def test_redis_entry_not_served_within_expiry_margin(prefix: str) -> None:
    config = make_config(prefix, sign_expires=3600, expiry_margin=300)

    async def body(a: Node, b: Node, c: Node) -> None:
        first, _ = await a.get("cat", T0)
        assert await b.get("cat", T0 + 3299.5) == (first, "redis")
        second, tier = await c.get("cat", T0 + 3300)
        assert tier == "miss"
        assert second.signed_at == T0 + 3300
        assert c.cache.signings == 1
        # The re-signed entry replaced the old one in Redis.
        assert await a.get("cat", T0 + 3301) == (second, "redis")

    run_nodes(config, 3, body)


def test_entry_from_redis_is_kept_in_the_lru_no_longer_than_the_margin(prefix: str) -> None:
    config = make_config(prefix, sign_expires=3600, expiry_margin=300, lru_ttl=100_000)

    async def body(a: Node, b: Node) -> None:
        first, _ = await a.get("cat", T0)
        assert await b.get("cat", T0 + 3000) == (first, "redis")
        assert await b.get("cat", T0 + 3299) == (first, "local")
        assert (await b.get("cat", T0 + 3300))[1] == "miss"

    run_nodes(config, 2, body)


def test_entries_expiring_within_the_margin_are_never_served_from_a_tier(prefix: str) -> None:
    config = make_config(prefix, sign_expires=3600, expiry_margin=300)

    async def main() -> None:
        a_store, b_store = RedisStore(config), RedisStore(config)
        try:
            # This signer's URLs live 100 s, less than the 300 s margin.
            a = Node(config, a_store, signer=CountingSigner(config, expires=100))
            b = Node(config, b_store, signer=CountingSigner(config, expires=100))
            for i in range(3):
                entry, tier = await a.get("cat", T0 + i)
                assert tier == "miss"
                assert entry.expires_at == T0 + i + 100
            assert a.cache.signings == 3
            assert (await b.get("cat", T0 + 3))[1] == "miss"
            assert b.cache.signings == 1
        finally:
            await a_store.aclose()
            await b_store.aclose()

    asyncio.run(main())


def test_lru_ttl_bounds_the_lru() -> None:
    config = make_config(url="", lru_ttl=60.0)

    async def main() -> None:
        node = Node(config, None)
        first, _ = await node.get("cat", T0)
        assert await node.get("cat", T0 + 59.9) == (first, "local")
        # Serving does not extend the deadline.
        assert (await node.get("cat", T0 + 60))[1] == "miss"
        assert node.cache.signings == 2

    asyncio.run(main())


def test_lru_ttl_expiry_falls_back_to_redis(prefix: str) -> None:
    config = make_config(prefix, lru_ttl=60.0)

    async def body(node: Node) -> None:
        first, _ = await node.get("cat", T0)
        assert await node.get("cat", T0 + 59) == (first, "local")
        assert await node.get("cat", T0 + 60) == (first, "redis")
        assert await node.get("cat", T0 + 119) == (first, "local")
        assert await node.get("cat", T0 + 120) == (first, "redis")
        assert node.cache.signings == 1

    run_nodes(config, 1, body)


# -- single flight ----------------------------------------------------------------------------


def test_concurrent_gets_of_one_id_share_one_resolution(prefix: str) -> None:
    config = make_config(prefix)

    async def body(node: Node) -> None:
        ids = ["cat"] * 50 + ["dog"] * 10 + ["owl"] * 10
        results = await asyncio.gather(*(node.get(i, T0) for i in ids))
        assert node.resolver.calls == {"cat": 1, "dog": 1, "owl": 1}
        assert node.cache.signings == 3
        assert len(node.signer.calls) == 3
        # Different ids were resolved concurrently, not one after another.
        assert node.resolver.max_active == 3
        by_id: dict[str, set[Entry]] = {}
        for image_id, (entry, tier) in zip(ids, results, strict=True):
            assert tier == "miss"
            assert entry.key == f"images/{image_id}"
            by_id.setdefault(image_id, set()).add(entry)
        assert all(len(entries) == 1 for entries in by_id.values())
        assert (await node.get("cat", T0 + 1))[1] == "local"

    run_nodes(config, 1, body, resolver=FakeResolver(delay=0.05))


def test_concurrent_gets_without_a_store_share_one_resolution() -> None:
    config = make_config(url="")

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(delay=0.05))
        results = await asyncio.gather(*(node.get("cat", T0) for _ in range(50)))
        assert node.resolver.total == 1
        assert node.cache.signings == 1
        assert len({entry for entry, _ in results}) == 1

    asyncio.run(main())


def test_concurrent_gets_of_a_missing_id_all_raise_not_found_after_one_resolution() -> None:
    config = make_config(url="")

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(delay=0.05, missing={"gone"}))
        results = await asyncio.gather(
            *(node.get("gone", T0) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, NotFound) for r in results)
        assert node.resolver.total == 1
        assert node.cache.signings == 0

    asyncio.run(main())


def test_a_new_flight_starts_after_the_previous_one_finished() -> None:
    config = make_config(url="", lru_size=0)

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(delay=0.01))
        await asyncio.gather(*(node.get("cat", T0) for _ in range(5)))
        await asyncio.gather(*(node.get("cat", T0 + 1) for _ in range(5)))
        assert node.resolver.total == 2

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_shared_resolution() -> None:
    config = make_config(url="")

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(delay=0.05))
        quitter = asyncio.create_task(node.get("cat", T0))
        stayers = [asyncio.create_task(node.get("cat", T0)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert node.resolver.active == 1
        quitter.cancel()
        results = await asyncio.gather(*stayers)
        assert quitter.cancelled()
        assert {tier for _, tier in results} == {"miss"}
        assert len({entry for entry, _ in results}) == 1
        assert node.resolver.total == 1
        assert node.resolver.finished == 1
        assert node.cache.signings == 1

    asyncio.run(main())


def test_when_every_waiter_is_cancelled_the_resolution_still_completes(prefix: str) -> None:
    config = make_config(prefix)

    async def body(node: Node, other: Node) -> None:
        waiters = [asyncio.create_task(node.get("cat", T0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert all(w.cancelled() for w in waiters)
        await asyncio.sleep(0.08)
        assert node.resolver.finished == 1
        entry, tier = await node.get("cat", T0 + 1)
        assert tier == "local"
        assert node.cache.signings == 1
        assert await other.get("cat", T0 + 1) == (entry, "redis")

    run_nodes(config, 2, body, resolver=FakeResolver(delay=0.05))


def test_cancelled_waiters_of_a_failing_resolution_leave_no_unretrieved_exception() -> None:
    config = make_config(url="")

    async def main() -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        node = Node(config, None, resolver=FakeResolver(delay=0.05, missing={"gone"}))
        waiters = [asyncio.create_task(node.get("gone", T0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await asyncio.sleep(0.08)
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 1)
        assert node.resolver.total == 1  # the negative entry was remembered anyway

    asyncio.run(main())


# -- negative caching -------------------------------------------------------------------------


def test_not_found_is_remembered_in_lru_and_redis_then_forgotten(
    prefix: str, raw: redis.Redis
) -> None:
    config = make_config(prefix, negative_ttl=0.25)
    resolver = FakeResolver(missing={"gone"})

    async def body(a: Node, b: Node) -> None:
        with pytest.raises(NotFound):
            await a.get("gone", T0)
        assert a.resolver.calls == {"gone": 1}
        assert a.cache.signings == 0
        with pytest.raises(NotFound):
            await a.get("gone", T0 + 0.1)
        assert a.resolver.calls == {"gone": 1}  # from the LRU

        key = f"{prefix}url:gone"
        assert raw.get(key) == b'{"missing":true}'
        assert 0 < raw.pttl(key) <= 250
        assert stored(raw, prefix, "gone") == MISSING

        # Another instance sees the negative entry in Redis without resolving.
        b.resolver.missing.clear()
        with pytest.raises(NotFound):
            await b.get("gone", T0 + 0.1)
        assert b.resolver.total == 0

        # After the negative ttl: the object now exists, and both tiers let it through.
        a.resolver.missing.clear()
        await asyncio.sleep(0.3)
        assert raw.exists(key) == 0
        entry, tier = await a.get("gone", T0 + 0.3)
        assert tier == "miss"
        assert entry.key == "images/gone"
        assert a.resolver.calls == {"gone": 2}

    async def main() -> None:
        sa, sb = RedisStore(config), RedisStore(config)
        try:
            await body(Node(config, sa, resolver=resolver), Node(config, sb))
        finally:
            await sa.aclose()
            await sb.aclose()

    asyncio.run(main())


def test_negative_lru_entry_expires_after_negative_ttl() -> None:
    config = make_config(url="", negative_ttl=30.0)

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(missing={"gone"}))
        with pytest.raises(NotFound):
            await node.get("gone", T0)
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 29.9)
        assert node.resolver.total == 1
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 30)
        assert node.resolver.total == 2

    asyncio.run(main())


def test_negative_entry_from_redis_is_remembered_locally(prefix: str) -> None:
    config = make_config(prefix, negative_ttl=30.0)

    async def body(a: Node, b: Node) -> None:
        a.resolver.missing.add("gone")
        with pytest.raises(NotFound):
            await a.get("gone", T0)
        with pytest.raises(NotFound):
            await b.get("gone", T0)
        await a.cache.forget("gone")  # Redis no longer has it; b's LRU still does
        with pytest.raises(NotFound):
            await b.get("gone", T0 + 1)
        assert b.resolver.total == 0

    run_nodes(config, 2, body)


def test_a_negative_lru_hit_counts_as_use_for_eviction() -> None:
    config = make_config(url="", lru_size=2)

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(missing={"gone"}))
        with pytest.raises(NotFound):
            await node.get("gone", T0)
        await node.get("a", T0)
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 1)  # "gone" is now the most recently used
        await node.get("b", T0 + 2)  # so this must evict "a"
        assert (await node.get("b", T0 + 3))[1] == "local"
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 3)
        assert node.resolver.calls["gone"] == 1

    asyncio.run(main())


def test_zero_negative_ttl_remembers_nothing(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix, negative_ttl=0.0)

    async def body(node: Node) -> None:
        node.resolver.missing.add("gone")
        for i in range(3):
            with pytest.raises(NotFound):
                await node.get("gone", T0 + i)
        assert node.resolver.total == 3
        assert raw.exists(f"{prefix}url:gone") == 0
        assert len(node.cache) == 0

    run_nodes(config, 1, body)


def test_mark_missing_overrides_a_cached_entry(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node) -> None:
        await a.get("cat", T0)
        await b.get("cat", T0)
        await a.cache.mark_missing("cat", T0 + 1)
        with pytest.raises(NotFound):
            await a.get("cat", T0 + 2)
        assert stored(raw, prefix, "cat") == MISSING
        assert 29_000 < raw.pttl(f"{prefix}url:cat") <= 30_000
        assert (await b.get("cat", T0 + 2))[1] == "local"  # b's LRU is not told
        assert a.resolver.total == 1

    run_nodes(config, 2, body)


def test_not_found_with_avoid_is_still_not_found() -> None:
    config = make_config(url="")

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(missing={"gone"}))
        with pytest.raises(NotFound):
            await node.get("gone", T0)
        with pytest.raises(NotFound):
            await node.get("gone", T0 + 1, avoid="https://cos.test/images/gone?sig=1")
        assert node.resolver.total == 1

    asyncio.run(main())


# -- avoid, forget ----------------------------------------------------------------------------


def test_avoid_skips_the_lru_entry_with_that_url(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(node: Node) -> None:
        first, _ = await node.get("cat", T0)
        second, tier = await node.get("cat", T0 + 1, avoid=first.url)
        assert tier == "miss"
        assert second.url != first.url
        assert node.cache.signings == 2
        assert stored(raw, prefix, "cat") == second
        assert await node.get("cat", T0 + 2) == (second, "local")
        # Avoiding a URL the cache no longer holds changes nothing.
        assert await node.get("cat", T0 + 3, avoid=first.url) == (second, "local")
        assert node.cache.signings == 2

    run_nodes(config, 1, body)


def test_avoid_skips_the_redis_entry_with_that_url(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node, c: Node) -> None:
        first, _ = await a.get("cat", T0)
        second, tier = await b.get("cat", T0 + 1, avoid=first.url)
        assert tier == "miss"
        assert second.url != first.url
        assert b.cache.signings == 1
        assert stored(raw, prefix, "cat") == second
        assert await c.get("cat", T0 + 2) == (second, "redis")
        assert c.cache.signings == 0

    run_nodes(config, 3, body)


def test_avoid_with_an_unrelated_url_serves_from_redis(prefix: str) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node) -> None:
        first, _ = await a.get("cat", T0)
        assert await b.get("cat", T0 + 1, avoid="https://elsewhere/") == (first, "redis")

    run_nodes(config, 2, body)


def test_forget_drops_lru_and_redis(prefix: str, raw: redis.Redis) -> None:
    config = make_config(prefix)

    async def body(a: Node, b: Node) -> None:
        first, _ = await a.get("cat", T0)
        await a.get("dog", T0)
        await a.cache.forget("cat")
        assert raw.exists(f"{prefix}url:cat") == 0
        assert raw.exists(f"{prefix}url:dog") == 1
        assert len(a.cache) == 1
        await a.cache.forget("never-seen")
        second, tier = await a.get("cat", T0 + 1)
        assert tier == "miss"
        assert second != first
        assert await b.get("cat", T0 + 2) == (second, "redis")
        assert a.cache.signings == 3

    run_nodes(config, 2, body)


# -- resolver output is checked ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["secret/passwd", "images/../secret", "images/", "images/a//b", "images/./a", "/images/a"],
)
def test_resolver_key_outside_the_prefix_is_bad_id(prefix: str, raw: redis.Redis, key: str) -> None:
    config = make_config(prefix)

    async def body(node: Node) -> None:
        node.resolver.keys["evil"] = key
        for _ in range(2):
            with pytest.raises(BadId):
                await node.get("evil", T0)
        assert node.resolver.total == 2  # not cached, positively or negatively
        assert node.signer.calls == []
        assert node.cache.signings == 0
        assert len(node.cache) == 0
        assert raw.exists(f"{prefix}url:evil") == 0

    run_nodes(config, 1, body)


def test_resolver_key_under_a_nested_prefix_is_accepted() -> None:
    config = make_config(url="", key_template="img/v1/{id}.png")

    async def main() -> None:
        node = Node(config, None, resolver=FakeResolver(keys={"x": "img/v1/a/b/x.png"}))
        entry, _ = await node.get("x", T0)
        assert entry.key == "img/v1/a/b/x.png"
        node.resolver.keys["y"] = "img/v2/y.png"
        with pytest.raises(BadId):
            await node.get("y", T0)

    asyncio.run(main())


# -- Redis down -------------------------------------------------------------------------------


def test_redis_down_every_get_still_succeeds_by_signing_locally(server: RedisServer) -> None:
    config = make_config(
        url=server.url, redis_timeout=0.1, redis_backoff=0.2, lru_size=0, negative_ttl=30.0
    )
    server.kill()

    async def body(node: Node) -> None:
        store = node.store
        assert store is not None
        start = time.monotonic()
        for i in range(10):
            entry, tier = await node.get(f"id{i % 3}", T0 + i)
            assert tier == "miss"
            assert entry.key == f"images/id{i % 3}"
        assert node.cache.signings == 10
        node.resolver.missing.add("gone")
        with pytest.raises(NotFound):
            await node.get("gone", T0)
        await node.cache.forget("id0")
        assert time.monotonic() - start < 1.0
        assert store.errors == 1  # one failure, then the backoff kept it out of the way
        await asyncio.sleep(0.25)
        assert (await node.get("id0", T0 + 20))[1] == "miss"
        assert store.errors == 2

    run_nodes(config, 1, body)


def test_redis_down_concurrent_gets_still_single_flight(server: RedisServer) -> None:
    config = make_config(url=server.url, redis_timeout=0.1, redis_backoff=5.0)
    server.kill()

    async def body(node: Node) -> None:
        results = await asyncio.gather(*(node.get("cat", T0) for _ in range(30)))
        assert {tier for _, tier in results} == {"miss"}
        assert node.resolver.total == 1
        assert (await node.get("cat", T0 + 1))[1] == "local"

    run_nodes(config, 1, body, resolver=FakeResolver(delay=0.02))


def test_paused_redis_costs_one_timeout_then_signs_locally(server: RedisServer) -> None:
    config = make_config(url=server.url, redis_timeout=0.1, redis_backoff=5.0)

    async def body(node: Node) -> None:
        await node.get("warm", T0)  # opens a pooled connection
        server.pause()
        try:
            start = time.monotonic()
            for i in range(5):
                assert (await node.get(f"id{i}", T0))[1] == "miss"
            assert time.monotonic() - start < 0.5
        finally:
            server.resume()

    run_nodes(config, 1, body)

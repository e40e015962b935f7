"""Everything that talks to Redis, against a real 3-node Redis Cluster (`redis_cluster=True`): the
proxy's store, the refresher's Lua scripts (the `{idx}` hash tag keeps `due` and `seen` in one
slot while payloads spread over the cluster), a refresher cycle, a proxy serving through it, and
the purge channel."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster

from proxy_service import sync
from proxy_service.app import ProxyApp
from proxy_service.cache import UrlCache
from proxy_service.config import Config
from proxy_service.index import Index
from proxy_service.storage import Entry
from proxy_service.store import MISSING, Keys, RedisStore, loads
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer
from tests.support.http import request as http_get
from tests.support.proxy import running
from tests.support.redis_cluster import RedisClusterServer
from tests.test_refresher import CountingSigner, FakeResolver, Worker, old_entry, seed

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed: it is needed to create the test Redis Cluster")
    with RedisClusterServer(tmp_path_factory.mktemp("cluster")) as server:
        yield server


@pytest.fixture
def config(cluster: RedisClusterServer) -> Config:
    """Settings of a proxy/refresher on the cluster, with a key prefix of this test's own (the
    cluster is private to this module and killed after it: no clean-up needed)."""
    return make_config(cluster.url, f"t:{uuid.uuid4().hex}:", redis_cluster=True)


def make_config(url: str, prefix: str, **changes: Any) -> Config:
    base: dict[str, Any] = {
        "redis_url": url,
        "redis_prefix": prefix,
        "redis_timeout": 2.0,
        "refresh_heartbeat_file": "",
    }
    base.update(changes)
    config = Config(**base)
    config.validate()
    return config


def raw(config: Config) -> SyncCluster:
    return SyncCluster.from_url(config.redis_url)


def scores(config: Config, key: str) -> dict[str, float]:
    with raw(config) as client:
        pairs = client.zrange(key, 0, -1, withscores=True)
    return {member.decode(): score for member, score in pairs}


def test_proxy_store_put_get_touch_on_a_cluster(
    cluster: RedisClusterServer, config: Config
) -> None:
    keys = Keys(config.redis_prefix)
    ids = [f"img{n}.png" for n in range(60)]
    now = time.time()

    async def main() -> None:
        store = RedisStore(config)
        try:
            assert await store.ping()
            entries = {i: old_entry(config, i, now + 100, now) for i in ids}
            for image_id, entry in entries.items():
                await store.put(image_id, entry, entry.expires_at - now)
            for image_id, entry in entries.items():
                assert await store.get(image_id) == entry
            await store.touch(ids[:10], now + 5)
            await store.put_missing("nope.png", 30)
            assert await store.get("nope.png") == MISSING
            await store.delete("img0.png")
            assert await store.get("img0.png") is None
            assert store.errors == 0
        finally:
            await store.aclose()

    asyncio.run(main())
    due, seen = scores(config, keys.due), scores(config, keys.seen)
    assert set(due) == set(seen) == set(ids)
    assert due["img1.png"] == pytest.approx(now + 100)
    assert all(seen[i] == pytest.approx(now + 5) for i in ids[:10])
    assert all(seen[i] == pytest.approx(now) for i in ids[10:])
    with raw(config) as client:
        assert client.keyslot(keys.due) == client.keyslot(keys.seen)  # the {idx} hash tag
        slots = {client.keyslot(keys.url(i)) for i in ids}
    assert len(slots) > 10  # payloads spread over the slots...
    holders = 0
    for port in cluster.ports:  # ... and over the nodes
        with redis.Redis(port=port) as node:
            holders += bool(list(node.scan_iter(match=keys.url("*"), count=1000)))
    assert holders >= 2


def test_index_scripts_on_a_cluster(config: Config) -> None:
    keys = Keys(config.redis_prefix)
    now = time.time()

    async def main() -> None:
        await seed(config, [f"img{n}.png" for n in range(20)], due_in=-10)
        await seed(config, ["idle.png"], due_in=-10, signed_at=now - 100_000)
        index = Index(config)
        try:
            assert await index.ping()
            assert await index.size() == 21
            assert await index.lag(now) == pytest.approx(10, abs=1)
            claimed = await index.claim(now, lease=30, limit=8)
            assert len(claimed) == 8
            due = scores(config, keys.due)
            assert all(due[i] == pytest.approx(now + 30) for i in claimed)
            rest = await index.claim(now, lease=30, limit=100)
            assert sorted(claimed + rest) == sorted(due)
            assert await index.claim(now, lease=30, limit=100) == []

            await index.release(claimed[:2], now)
            assert sorted(await index.claim(now, lease=30, limit=100)) == sorted(claimed[:2])

            assert await index.retire_if_idle("idle.png", now - 86_400)
            assert not await index.retire_if_idle("img1.png", now - 86_400)
            assert "idle.png" not in scores(config, keys.seen)

            fresh = Entry("images/img1.png", "https://new/get", "https://new/head", now + 3600, now)
            assert await index.store("img1.png", fresh, now)
            with raw(config) as client:
                stored = client.get(keys.url("img1.png"))
            assert isinstance(stored, bytes)
            assert loads(stored) == fresh

            await index.purge("img1.png")
            assert not await index.store("img1.png", fresh, now)
            with raw(config) as client:
                assert client.get(keys.url("img1.png")) is None
            assert "img1.png" not in scores(config, keys.due)
            assert await index.store("img1.png", fresh, now, force=True)
            assert await index.size() == 20
        finally:
            await index.aclose()

    asyncio.run(main())


def test_refresher_cycle_on_a_cluster(config: Config) -> None:
    keys = Keys(config.redis_prefix)
    ids = [f"img{n}.png" for n in range(100)]

    async def main() -> None:
        await seed(config, ids)
        start = time.time()
        async with Worker(config, FakeResolver(missing=["img7.png"])) as worker:
            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.refreshed, stats.retired) == (100, 99, 1)
            assert (await worker.refresher.cycle()).claimed == 0
            assert set(worker.signer.signed.values()) == {1}
            last = worker.signer.last
        due = scores(config, keys.due)
        assert set(due) == set(ids) - {"img7.png"}
        assert all(due[i] == pytest.approx(last[i].expires_at - config.refresh_before) for i in due)
        with raw(config) as client:
            for image_id in ids:
                stored = client.get(keys.url(image_id))
                if image_id == "img7.png":
                    assert stored is None
                else:
                    assert isinstance(stored, bytes)
                    entry = loads(stored)
                    assert isinstance(entry, Entry)
                    assert entry == last[image_id]
                    assert entry.signed_at >= start

    asyncio.run(main())


def test_proxy_serves_through_a_cluster(
    config: Config, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    keys = Keys(config.redis_prefix)
    body = b"cat pixels " * 1000
    cos.put("images/cat.png", body)
    proxy_config = cos_config(
        redis_url=config.redis_url,
        redis_cluster=True,
        redis_prefix=config.redis_prefix,
        redis_timeout=2.0,
        access_flush_interval=0.2,
    )
    with running(proxy_config) as first:
        reply = http_get(first.base_url + "/images/cat.png")
        assert reply.status == 200
        assert reply.body == body
        assert first.app.cache.signings == 1
        with raw(config) as client:
            stored = client.get(keys.url("cat.png"))
        assert isinstance(stored, bytes)
        entry = loads(stored)
        assert isinstance(entry, Entry)
        assert entry.key == "images/cat.png"
        assert "q-signature=" in entry.url
        due = scores(config, keys.due)
        assert due["cat.png"] == pytest.approx(entry.expires_at - config.refresh_before)
        signed_seen = scores(config, keys.seen)["cat.png"]
        # A second request is an LRU hit; the access flush records it in `seen`.
        assert http_get(first.base_url + "/images/cat.png").status == 200
        deadline = time.monotonic() + 5
        while scores(config, keys.seen)["cat.png"] == signed_seen:
            assert time.monotonic() < deadline, "the access flush never reached the cluster"
            time.sleep(0.05)
        assert first.app.store is not None
        assert first.app.store.errors == 0
        signed_seen = scores(config, keys.seen)["cat.png"]
    # Another replica gets the URL from the cluster and signs nothing.
    with running(proxy_config) as second:
        reply = http_get(second.base_url + "/images/cat.png")
        assert reply.status == 200
        assert reply.body == body
        assert second.app.cache.signings == 0
        # The Redis hit is flushed to `seen` too.
        deadline = time.monotonic() + 5
        while scores(config, keys.seen)["cat.png"] == signed_seen:
            assert time.monotonic() < deadline, "the access flush never reached the cluster"
            time.sleep(0.05)
        assert second.app.store is not None
        assert second.app.store.errors == 0
    assert [r.status for r in cos.requests] == [200, 200, 200]  # every URL passed COS's check


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_purge_listener_drops_lru_entries(
    topology: str, redis_prefix: str, request: pytest.FixtureRequest
) -> None:
    if topology == "cluster":
        cluster: RedisClusterServer = request.getfixturevalue("cluster")
        config = make_config(cluster.url, redis_prefix, redis_cluster=True)
    else:
        config = make_config(REDIS_URL, redis_prefix)

    async def main() -> None:
        cache = UrlCache(config, FakeResolver(), CountingSigner(config), None)
        await cache.get("cat.png", time.time())
        await cache.get("dog.png", time.time())
        assert len(cache) == 2
        listener = asyncio.ensure_future(sync.listen_purges(config, cache))
        index = Index(config)
        try:
            # Announce until the listener (subscribing in the background) hears it.
            deadline = time.monotonic() + 5
            while len(cache) == 2 and time.monotonic() < deadline and not listener.done():
                await index.announce("cat.png")
                await asyncio.sleep(0.05)
            assert not listener.done(), f"the purge listener died: {listener.exception()!r}"
            assert len(cache) == 1
            _, tier = await cache.get("dog.png", time.time())
            assert tier == "local"  # only the announced id was dropped
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await index.aclose()

    asyncio.run(main())


def test_proxy_shutdown_survives_a_swallowed_cancellation(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the shutdown cancelled flush_access once and waited for it forever, and on
    # Python 3.11 redis-py's asyncio.wait_for swallows a cancel that arrives with the reply
    # (CPython gh-86296). Seen for real in test_proxy_serves_through_a_cluster (a 10 s hang at
    # shutdown in about one run of three); made deterministic here.
    config = make_config(REDIS_URL, redis_prefix, access_flush_interval=0.05)

    async def main() -> None:
        app = ProxyApp(config)
        assert app.store is not None
        store = app.store
        flushing = asyncio.Event()

        async def touch(image_ids: Any, now: float) -> None:
            # What a real touch does when the stop arrives together with Redis's reply.
            flushing.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.5)

        monkeypatch.setattr(store, "touch", touch)
        lifespan = app._lifespan(app.router)
        await lifespan.__aenter__()
        stopping: asyncio.Future[bool | None] | None = None
        try:
            await app.cache.get("sample.png", time.time())  # a miss...
            await app.cache.get("sample.png", time.time())  # ... then a hit, to be flushed
            await asyncio.wait_for(flushing.wait(), 5)
            stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
            done, _ = await asyncio.wait([stopping], timeout=2)
            assert done, "the proxy's shutdown hangs"
        finally:
            if stopping is None or not stopping.done():
                if stopping is not None:
                    stopping.cancel()  # a second cancel gets the loop out of its sleep
                    await asyncio.gather(stopping, return_exceptions=True)
                await store.aclose()

    asyncio.run(main())

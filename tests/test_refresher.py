"""The refresher against a real Redis: re-signing before expiry for every proxy, exclusive claims
across replicas, retirement, purges, failures and their lease, graceful stop, the heartbeat, and
real `proxy-service refresher` processes that are killed mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
from redis.asyncio.client import PubSub

from proxy_service import refresher as refresher_mod
from proxy_service.cache import UrlCache
from proxy_service.config import Config
from proxy_service.errors import NotFound
from proxy_service.index import Index
from proxy_service.refresher import Refresher, poll
from proxy_service.storage import Entry
from proxy_service.storage.local import LocalSigner
from proxy_service.store import Keys, RedisStore, close, connect, dumps, loads
from tests.support.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"
_SIGNATURES = itertools.count(1)  # unique URLs across every signer of the test run


# -- parts ------------------------------------------------------------------------------------


class FakeResolver:
    """`images/<id>`; ids in `missing` raise NotFound; an optional delay makes batches slow and
    `hook` runs inside a resolution (to race something against a refresh)."""

    def __init__(
        self,
        delay: float = 0.0,
        missing: Iterable[str] = (),
        hook: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.delay = delay
        self.missing = set(missing)
        self.hook = hook
        self.calls: Counter[str] = Counter()
        self.active = 0

    async def resolve(self, image_id: str) -> str:
        self.calls[image_id] += 1
        self.active += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.hook is not None:
                await self.hook(image_id)
            if image_id in self.missing:
                raise NotFound()
            return f"images/{image_id}"
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        return None


class CountingSigner:
    """The real `LocalSigner` with a unique URL per signing, counting signatures per id; ids in
    `failing` raise (once each, or every time with `fail_always`)."""

    def __init__(
        self, config: Config, failing: Iterable[str] = (), fail_always: bool = False
    ) -> None:
        self._inner = LocalSigner(config)
        self.failing = set(failing)
        self.fail_always = fail_always
        self.signed: Counter[str] = Counter()  # successful signatures, by image id
        self.last: dict[str, Entry] = {}

    def sign(self, key: str, now: float) -> Entry:
        image_id = key.removeprefix("images/")
        if image_id in self.failing:
            if not self.fail_always:
                self.failing.discard(image_id)
            raise RuntimeError("signing failed")
        n = next(_SIGNATURES)
        entry = dataclasses.replace(
            self._inner.sign(key, now),
            url=f"https://cos.test/{key}?sig={n}",
            head_url=f"https://cos.test/{key}?head={n}",
        )
        self.signed[image_id] += 1
        self.last[image_id] = entry
        return entry

    def head_url(self, entry: Entry, now: float) -> str:
        return entry.url.replace("?sig=", "?head=")

    @property
    def total(self) -> int:
        return sum(self.signed.values())


def make_config(prefix: str, **changes: Any) -> Config:
    base: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "redis_timeout": 2.0,  # the shared server may be busy with other tests
        "refresh_heartbeat_file": "",
    }
    base.update(changes)
    config = Config(**base)
    config.validate()
    return config


def old_entry(config: Config, image_id: str, due_at: float, signed_at: float | None) -> Entry:
    """An entry a proxy signed earlier, whose refresh time (expires_at - refresh_before) is
    `due_at`."""
    expires_at = due_at + config.refresh_before
    return Entry(
        key=f"images/{image_id}",
        url=f"https://cos.test/images/{image_id}?sig=old",
        head_url=f"https://cos.test/images/{image_id}?head=old",
        expires_at=expires_at,
        signed_at=expires_at - config.sign_expires if signed_at is None else signed_at,
    )


async def seed(
    config: Config, ids: Iterable[str], due_in: float = -1.0, signed_at: float | None = None
) -> None:
    """Enter ids the way a proxy does after signing them (`RedisStore.put`), due in `due_in`."""
    store = RedisStore(config)
    try:
        now = time.time()
        entries = [(i, old_entry(config, i, now + due_in, signed_at)) for i in ids]
        await asyncio.gather(*(store.put(i, e, e.expires_at - now) for i, e in entries))
        assert store.errors == 0
    finally:
        await store.aclose()


def bulk_seed(config: Config, ids: Sequence[str], due_at: float) -> None:
    """What `RedisStore.put` writes for each id, in one pipeline (20x faster for big indexes)."""
    keys = Keys(config.redis_prefix)
    now = time.time()
    entries = [old_entry(config, i, due_at, None) for i in ids]
    with redis.Redis.from_url(REDIS_URL) as client:
        pipe = client.pipeline(transaction=False)
        for image_id, entry in zip(ids, entries, strict=True):
            pipe.set(keys.url(image_id), dumps(entry), px=int((entry.expires_at - now) * 1000))
        pairs = list(zip(ids, entries, strict=True))
        pipe.zadd(keys.due, {i: e.expires_at - config.refresh_before for i, e in pairs})
        pipe.zadd(keys.seen, {i: e.signed_at for i, e in pairs})
        pipe.execute()


def scores(config: Config, which: str = "due") -> dict[str, float]:
    keys = Keys(config.redis_prefix)
    with redis.Redis.from_url(REDIS_URL) as client:
        pairs = client.zrange(keys.due if which == "due" else keys.seen, 0, -1, withscores=True)
    return {member.decode(): score for member, score in pairs}


def payloads(config: Config, ids: Sequence[str]) -> dict[str, Entry | None]:
    keys = Keys(config.redis_prefix)
    out: dict[str, Entry | None] = {}
    with redis.Redis.from_url(REDIS_URL) as client:
        for start in range(0, len(ids), 2000):
            chunk = ids[start : start + 2000]
            for image_id, raw in zip(chunk, client.mget([keys.url(i) for i in chunk]), strict=True):
                value = loads(raw) if isinstance(raw, bytes) else None
                out[image_id] = value if isinstance(value, Entry) else None
    return out


def fresh_after(config: Config, start: float) -> float:
    """A due score above this was written by a re-signing after `start` (old and leased ones are
    far below it)."""
    return start + (config.sign_expires - config.refresh_before) - 60


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def next_message(pubsub: PubSub, within: float = 5.0) -> bytes:
    """The data of the next message on a subscribed channel (skipping the confirmations)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None and message["type"] == "message":
            data = message["data"]
            assert isinstance(data, bytes)
            return data
    raise AssertionError("no message on the purge channel")


class Worker:
    """A `Refresher` with its own `Index` and Redis client, closed in the loop that uses it."""

    def __init__(
        self,
        config: Config,
        resolver: FakeResolver | None = None,
        signer: CountingSigner | None = None,
        index: Index | None = None,
    ) -> None:
        self.resolver = resolver or FakeResolver()
        self.signer = signer or CountingSigner(config)
        self.index = index or Index(config)
        self.refresher = Refresher(config, self.index, self.resolver, self.signer)

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.index.aclose()


# -- one refresher in the test's loop ---------------------------------------------------------


def test_entry_signed_by_a_proxy_is_resigned_before_expiry_and_shared(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    now = time.time()
    # Proxy A signed cat.png long enough ago that it is due for a refresh now.
    signed_at = now - (config.sign_expires - config.refresh_before) - 10

    async def main() -> None:
        store_a, store_b = RedisStore(config), RedisStore(config)
        signer_a, signer_b = CountingSigner(config), CountingSigner(config)
        proxy_a = UrlCache(config, FakeResolver(), signer_a, store_a)
        proxy_b = UrlCache(config, FakeResolver(), signer_b, store_b)
        try:
            old, tier = await proxy_a.get("cat.png", signed_at)
            assert tier == "miss"
            assert scores(config)["cat.png"] == pytest.approx(now - 10)

            async with Worker(config) as worker:
                stats = await worker.refresher.cycle()
                assert (stats.claimed, stats.refreshed) == (1, 1)
                assert worker.signer.signed == {"cat.png": 1}
                new = worker.signer.last["cat.png"]
            # Re-signed with plenty of life left on the old URL: no proxy ever gets close to
            # serving an expiring one.
            assert old.expires_at - time.time() > config.expiry_margin + 60
            assert new.url != old.url
            assert new.expires_at > old.expires_at
            assert scores(config)["cat.png"] == pytest.approx(
                new.expires_at - config.refresh_before
            )

            # Another proxy gets the new URL from Redis and signs nothing.
            entry, tier = await proxy_b.get("cat.png", time.time())
            assert tier == "redis"
            assert entry == new
            assert proxy_b.signings == 0
            assert signer_b.total == 0
        finally:
            await store_a.aclose()
            await store_b.aclose()

    asyncio.run(main())


def test_three_refreshers_sign_each_due_id_exactly_once(redis_prefix: str) -> None:
    config = make_config(redis_prefix, refresh_batch=40, refresh_concurrency=8)
    ids = [f"img{n}.png" for n in range(600)]

    async def main() -> None:
        await seed(config, ids)
        resolver = FakeResolver(delay=0.001)  # slow enough for the three to interleave
        signer = CountingSigner(config)
        workers = [Worker(config, resolver, signer) for _ in range(3)]
        try:
            results = await asyncio.gather(*(w.refresher.cycle() for w in workers))
            assert sorted(signer.signed) == sorted(ids)
            assert set(signer.signed.values()) == {1}
            assert sum(s.claimed for s in results) == len(ids)
            assert sum(s.refreshed for s in results) == len(ids)
            assert all(s.claimed > 0 for s in results)  # all three took part
            # Nothing is due any more: another round signs nothing.
            again = await asyncio.gather(*(w.refresher.cycle() for w in workers))
            assert sum(s.claimed for s in again) == 0
            assert signer.total == len(ids)
        finally:
            for worker in workers:
                await worker.index.aclose()
        start = time.time() - 60
        assert all(score > fresh_after(config, start) for score in scores(config).values())

    asyncio.run(main())


def test_idle_ids_are_retired_while_hot_ids_keep_being_refreshed(redis_prefix: str) -> None:
    config = make_config(redis_prefix, refresh_idle=600.0)
    hot = [f"hot{n}.png" for n in range(5)]
    idle = [f"idle{n}.png" for n in range(5)]

    async def main() -> None:
        # Signed ~27 minutes ago and not served since: older than refresh_idle.
        await seed(config, hot + idle)
        store = RedisStore(config)
        try:
            await store.touch(hot, time.time())  # a proxy's access flush
        finally:
            await store.aclose()

        async with Worker(config) as worker:
            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.refreshed, stats.retired) == (10, 5, 5)
            assert set(scores(config)) == set(hot)
            assert set(scores(config, "seen")) == set(hot)
            # Retired ids keep their payload until its TTL: proxies still serve it meanwhile.
            assert all(payloads(config, idle).values())

            # The hot ids come due again (as if their next refresh time had come) and are
            # re-signed again; the retired ones are never signed.
            await worker.index.release(hot, time.time())
            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.refreshed, stats.retired) == (5, 5, 0)
            assert worker.signer.signed == dict.fromkeys(hot, 2)
            assert worker.resolver.calls.keys() == set(hot)

    asyncio.run(main())


def test_resolver_not_found_purges_the_id(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    keys = Keys(redis_prefix)

    async def main() -> None:
        await seed(config, ["cat.png", "gone.png"])
        listener = connect(config, 5.0)
        try:
            async with (
                listener.pubsub() as pubsub,
                Worker(config, FakeResolver(missing=["gone.png"])) as worker,
            ):
                await pubsub.subscribe(keys.purge)
                stats = await worker.refresher.cycle()
                assert await next_message(pubsub) == b"gone.png"
                assert (stats.claimed, stats.refreshed, stats.retired) == (2, 1, 1)
                assert worker.signer.signed == {"cat.png": 1}
        finally:
            await close(listener)
        assert set(scores(config)) == {"cat.png"}
        assert set(scores(config, "seen")) == {"cat.png"}
        assert payloads(config, ["gone.png"]) == {"gone.png": None}

    asyncio.run(main())


def test_failed_refreshes_are_counted_and_retried_after_the_lease(redis_prefix: str) -> None:
    config = make_config(redis_prefix, refresh_lease=1.0)
    ids = [f"img{n}.png" for n in range(10)]
    failing = {"img2.png", "img5.png", "img7.png"}

    async def main() -> None:
        await seed(config, ids)
        async with Worker(config, signer=CountingSigner(config, failing)) as worker:
            started = time.time()
            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.refreshed, stats.failed) == (10, 7, 3)
            due = scores(config)
            for image_id in failing:  # still in the index, leased: not lost
                assert started < due[image_id] <= time.time() + config.refresh_lease
            # Within the lease nobody retries them...
            assert (await worker.refresher.cycle()).claimed == 0
            # ... after it, the next cycle does (and this time signing works).
            await asyncio.sleep(config.refresh_lease + 0.05)
            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.refreshed, stats.failed) == (3, 3, 0)
            assert worker.signer.signed == dict.fromkeys(ids, 1)
            totals = worker.refresher.totals
            assert (totals.cycles, totals.claimed, totals.refreshed, totals.failed) == (
                3,
                13,
                10,
                3,
            )
        fresh = fresh_after(config, started)
        assert all(score > fresh for score in scores(config).values())
        entries = payloads(config, ids)
        assert all(e is not None and e.signed_at >= started for e in entries.values())

    asyncio.run(main())


def test_stop_mid_batch_drains_then_hands_back_the_rest(redis_prefix: str) -> None:
    config = make_config(
        redis_prefix,
        refresh_batch=10,
        refresh_concurrency=2,
        refresh_drain_timeout=0.5,
        refresh_lease=60.0,
        refresh_interval=0.05,
    )
    ids = [f"img{n:02}.png" for n in range(30)]

    async def main() -> None:
        await seed(config, ids)
        started = time.time()
        async with Worker(config, FakeResolver(delay=0.25)) as worker:
            task = asyncio.ensure_future(worker.refresher.run())
            await wait_for(lambda: worker.signer.total >= 2, 5, "the first refreshes")
            at_stop = worker.signer.total
            # What `serve` does on SIGTERM: no cancel, the worker drains and ends by itself.
            worker.refresher.stop.set()
            t0 = time.monotonic()
            await asyncio.wait_for(task, config.refresh_drain_timeout + 2)
            elapsed = time.monotonic() - t0
            assert elapsed < config.refresh_drain_timeout + 0.5
            done = worker.signer.total
            assert at_stop < done < config.refresh_batch  # drained some, not the whole batch
            assert worker.resolver.active == 0  # the rest was cancelled, not left running
            # Everything not refreshed is due right now (released, or never claimed), not
            # after the 60 s lease.
            now = time.time()
            due = scores(config)
            fresh = fresh_after(config, started)
            refreshed = {i for i, s in due.items() if s > fresh}
            # An id the drain timeout cut off between signing and storing is handed back with
            # the rest (signed again later): every signed id is stored or due now.
            assert refreshed <= set(worker.signer.signed)
            assert all(due[i] <= now for i in ids if i not in refreshed)
            again = await worker.index.claim(now, 60, 100)
            assert sorted(again) == sorted(set(ids) - refreshed)

    asyncio.run(main())


def test_poll_yields_at_once_then_per_interval_until_stopped() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        start = time.monotonic()
        ticks: list[float] = []
        async for _ in poll(0.1, stop):
            ticks.append(time.monotonic() - start)
            if len(ticks) == 3:
                stop.set()
        ended = time.monotonic() - start
        assert len(ticks) == 3
        assert ticks[0] < 0.05
        for before, after in itertools.pairwise(ticks):
            assert 0.09 <= after - before < 0.3
        assert ended - ticks[-1] < 0.05  # a stop set during a tick ends the loop at once

        # A stop while it waits ends it at once, not after the interval.
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        start = time.monotonic()
        count = 0
        async for _ in poll(30, stop):
            count += 1
        assert count == 1
        assert time.monotonic() - start < 1

        # Already stopped: no tick at all.
        async for _ in poll(0.01, stop):
            raise AssertionError("poll yielded after stop")

    asyncio.run(main())


def test_heartbeat_after_a_cycle_and_check(redis_prefix: str, tmp_path: Path) -> None:
    alive = tmp_path / "alive"
    config = make_config(redis_prefix, refresh_heartbeat_file=str(alive), refresh_interval=0.05)
    assert not refresher_mod.check(config)  # no file yet

    async def main() -> None:
        await seed(config, ["cat.png"])
        async with Worker(config) as worker:
            task = asyncio.ensure_future(worker.refresher.run())
            await wait_for(alive.exists, 5, "the heartbeat file")
            assert worker.refresher.totals.cycles >= 1
            assert worker.signer.signed == {"cat.png": 1}
            worker.refresher.stop.set()
            await asyncio.wait_for(task, 2)  # stop alone ends run() after the current cycle

    asyncio.run(main())
    assert refresher_mod.check(config)
    mtime = alive.stat().st_mtime
    limit = 3 * config.refresh_interval + 30
    assert refresher_mod.check(config, now=mtime + limit - 1)
    assert not refresher_mod.check(config, now=mtime + limit + 1)
    os.utime(alive, (time.time() - limit - 5, time.time() - limit - 5))
    assert not refresher_mod.check(config)
    alive.unlink()
    assert not refresher_mod.check(config)
    assert not refresher_mod.check(config.replace(refresh_heartbeat_file=""))


def test_failed_cycle_counts_the_error_and_writes_no_heartbeat(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    alive = tmp_path / "alive"
    config = make_config(
        "p:", redis_url=private_redis.url, refresh_heartbeat_file=str(alive), refresh_interval=0.05
    )
    private_redis.kill()

    async def main() -> None:
        async with Worker(config) as worker:
            task = asyncio.ensure_future(worker.refresher.run())
            await wait_for(lambda: sum(worker.refresher.totals.errors.values()) >= 2, 5, "errors")
            worker.refresher.stop.set()
            await asyncio.wait_for(task, 2)  # Redis errors never end the loop
            assert worker.refresher.totals.errors.keys() == {"ConnectionError"}
            assert worker.refresher.totals.cycles == 0

    asyncio.run(main())
    assert not alive.exists()
    assert not refresher_mod.check(config)


def test_totals_and_lag(redis_prefix: str) -> None:
    config = make_config(redis_prefix, refresh_batch=10, refresh_idle=600.0)
    fine = [f"img{n:02}.png" for n in range(20)]
    idle = ["idle1.png", "idle2.png"]
    failing = ["bad1.png", "bad2.png"]
    due = [*fine, *failing, "gone.png"]

    async def main() -> None:
        await seed(config, due, due_in=-20, signed_at=time.time())
        await seed(config, idle, due_in=-20)  # signed long ago, never served since
        await seed(config, ["later1.png", "later2.png"], due_in=500, signed_at=time.time())
        resolver = FakeResolver(missing=["gone.png"])
        async with Worker(config, resolver, CountingSigner(config, failing, True)) as worker:
            stats = await worker.refresher.cycle()
            assert stats.lag == pytest.approx(20, abs=1)
            assert (stats.claimed, stats.refreshed, stats.failed, stats.retired) == (25, 20, 2, 3)
            totals = worker.refresher.totals
            assert (totals.cycles, totals.claimed, totals.refreshed) == (1, 25, 20)
            assert (totals.failed, totals.retired) == (2, 3)
            assert totals.lag == stats.lag
            assert totals.index_size == 27 - 3  # the retired and the purged are gone
            assert totals.last_cycle_at == pytest.approx(time.time(), abs=2)
            assert await worker.index.lag(time.time()) == 0.0  # failures are leased, not late

            stats = await worker.refresher.cycle()
            assert (stats.claimed, stats.lag) == (0, 0.0)
            assert (totals.cycles, totals.claimed, totals.refreshed, totals.lag) == (2, 25, 20, 0)
            assert totals.index_size == 24

    asyncio.run(main())


def test_refresh_now_resigns_announces_and_purges_missing_ids(redis_prefix: str) -> None:
    config = make_config(redis_prefix)
    keys = Keys(redis_prefix)

    async def main() -> None:
        await seed(config, ["gone.png"], due_in=600)
        listener = connect(config, 5.0)
        try:
            async with (
                listener.pubsub() as pubsub,
                Worker(config, FakeResolver(missing=["gone.png"])) as worker,
            ):
                await pubsub.subscribe(keys.purge)
                before = time.time()
                # Not in the index at all (never served, or purged earlier): forced back in.
                assert await worker.refresher.refresh_now("new.png")
                assert not await worker.refresher.refresh_now("gone.png")
                assert [await next_message(pubsub), await next_message(pubsub)] == [
                    b"new.png",
                    b"gone.png",
                ]
                new = worker.signer.last["new.png"]
        finally:
            await close(listener)
        assert payloads(config, ["new.png", "gone.png"]) == {"new.png": new, "gone.png": None}
        assert scores(config) == {"new.png": pytest.approx(new.expires_at - config.refresh_before)}
        assert scores(config, "seen")["new.png"] >= before
        assert "gone.png" not in scores(config, "seen")

    asyncio.run(main())


def test_id_purged_during_its_refresh_is_not_written_back(redis_prefix: str) -> None:
    config = make_config(redis_prefix)

    async def main() -> None:
        await seed(config, ["cat.png", "dog.png"])
        admin = Index(config)

        async def purge_cat(image_id: str) -> None:
            if image_id == "cat.png":
                await admin.purge(image_id)  # `proxy-service purge cat.png`, mid-refresh

        try:
            async with Worker(config, FakeResolver(hook=purge_cat)) as worker:
                stats = await worker.refresher.cycle()
                assert stats.claimed == 2
        finally:
            await admin.aclose()
        assert set(scores(config)) == {"dog.png"}
        assert payloads(config, ["cat.png"]) == {"cat.png": None}

    asyncio.run(main())


# -- regressions (each of these failed before its fix) -----------------------------------------


def test_payload_write_failure_is_retried_after_the_lease(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: Index.store moved the due score before writing the payload: a failed payload write
    # (or a crash in between) left the old URL behind a refresh time ~27 minutes away.
    config = make_config(redis_prefix, refresh_lease=0.3)

    async def main() -> None:
        await seed(config, ["cat.png"])
        async with Worker(config) as worker:
            real_set = worker.index._redis.set
            calls = itertools.count()

            async def set_fails_once(*args: Any, **kwargs: Any) -> Any:
                if next(calls) == 0:
                    raise redis.exceptions.ConnectionError("connection lost")
                return await real_set(*args, **kwargs)

            monkeypatch.setattr(worker.index._redis, "set", set_fails_once)
            stats = await worker.refresher.cycle()
            assert (stats.refreshed, stats.failed) == (0, 1)
            await asyncio.sleep(config.refresh_lease + 0.05)
            stats = await worker.refresher.cycle()
            assert stats.refreshed == 1
            assert payloads(config, ["cat.png"]) == {"cat.png": worker.signer.last["cat.png"]}

    asyncio.run(main())


def test_stop_during_a_claim_hands_the_claimed_ids_back(redis_prefix: str) -> None:
    # Regression: a stop landing while a claim's reply was on its way left the ids leased for the
    # whole lease instead of handing them back.
    config = make_config(redis_prefix, refresh_lease=60.0, refresh_interval=0.05)
    claimed = asyncio.Event()

    class SlowReplyIndex(Index):
        async def claim(self, now: float, lease: float, limit: int) -> list[str]:
            ids = await super().claim(now, lease, limit)  # done on the server...
            claimed.set()
            await asyncio.sleep(0.5)  # ... and the reply still on its way back
            return ids

    async def main() -> None:
        await seed(config, ["a.png", "b.png"])
        async with Worker(config, index=SlowReplyIndex(config)) as worker:
            task = asyncio.ensure_future(worker.refresher.run())
            await asyncio.wait_for(claimed.wait(), 5)
            worker.refresher.stop.set()
            await asyncio.wait_for(task, 5)
            assert worker.signer.total == 0
            # Handed back at once, not leased for 60 s with nobody working on them.
            assert sorted(await worker.index.claim(time.time(), 60, 10)) == ["a.png", "b.png"]

    asyncio.run(main())


def test_heartbeat_is_written_while_a_long_drain_progresses(
    redis_prefix: str, tmp_path: Path
) -> None:
    # Regression: the heartbeat was written only after a whole cycle, and a cycle drains the whole
    # backlog: a long drain (start-up after an outage) failed the liveness probe.
    alive = tmp_path / "alive"
    config = make_config(
        redis_prefix,
        refresh_heartbeat_file=str(alive),
        refresh_batch=5,
        refresh_concurrency=5,
        refresh_interval=0.05,
    )

    async def main() -> None:
        await seed(config, [f"img{n}.png" for n in range(20)])
        async with Worker(config, FakeResolver(delay=0.2)) as worker:
            task = asyncio.ensure_future(worker.refresher.run())
            try:
                await wait_for(lambda: worker.signer.total >= 5, 5, "the first batch")
                assert worker.signer.total < 20  # the cycle is still draining...
                await asyncio.sleep(0.05)
                assert alive.exists()  # ... and has shown a sign of life already
            finally:
                worker.refresher.stop.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    asyncio.run(main())


def test_access_flush_after_a_purge_leaves_nothing_in_seen(redis_prefix: str) -> None:
    # Regression: RedisStore.touch added ids to `seen` unconditionally: a proxy's access flush after
    # a purge (or retirement) re-created an entry nothing ever removed.
    config = make_config(redis_prefix)

    async def main() -> None:
        await seed(config, ["gone.png"])
        store = RedisStore(config)
        proxy = UrlCache(config, FakeResolver(), CountingSigner(config), store)
        try:
            _, tier = await proxy.get("gone.png", time.time())  # served from Redis
            assert tier == "redis"
            async with Worker(config, FakeResolver(missing=["gone.png"])) as worker:
                assert (await worker.refresher.cycle()).retired == 1  # the object is gone
                assert "gone.png" not in scores(config, "seen")
                # The proxy's next access flush (sync.flush_access) ...
                await store.touch(proxy.take_touched(), time.time())
                await worker.refresher.cycle()
            # ... must not put it back into `seen`, where no retirement or purge would look.
            assert "gone.png" not in scores(config, "seen")
        finally:
            await store.aclose()

    asyncio.run(main())


def test_id_purged_during_its_refresh_is_not_counted_as_refreshed(redis_prefix: str) -> None:
    # Regression: Refresher._refresh ignored Index.store's False and counted a purged id as
    # refreshed.
    config = make_config(redis_prefix)

    async def main() -> None:
        await seed(config, ["cat.png"])
        admin = Index(config)

        async def purge(image_id: str) -> None:
            await admin.purge(image_id)

        try:
            async with Worker(config, FakeResolver(hook=purge)) as worker:
                stats = await worker.refresher.cycle()
                assert (stats.refreshed, stats.retired) == (0, 1)
        finally:
            await admin.aclose()

    asyncio.run(main())


def test_local_storage_entries_are_shared_through_redis(redis_prefix: str) -> None:
    # Regression: UrlCache._load skipped a Redis entry whose url equalled `avoid`, and both are ""
    # with local storage: every proxy re-signed and rewrote Redis.
    config = make_config(redis_prefix)  # storage=local: LocalSigner, whose URLs are ""

    async def main() -> None:
        store_a, store_b = RedisStore(config), RedisStore(config)
        try:
            proxy_a = UrlCache(config, FakeResolver(), LocalSigner(config), store_a)
            proxy_b = UrlCache(config, FakeResolver(), LocalSigner(config), store_b)
            entry, tier = await proxy_a.get("sample.png", time.time())
            assert tier == "miss"
            assert payloads(config, ["sample.png"]) == {"sample.png": entry}
            _, tier = await proxy_b.get("sample.png", time.time())
            assert tier == "redis"
        finally:
            await store_a.aclose()
            await store_b.aclose()

    asyncio.run(main())


# -- real `proxy-service refresher` processes -------------------------------------------------


class RefresherProcess:
    """`python -m proxy_service refresher` configured through the environment; killed on exit."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RefresherProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy_service", "refresher"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def refresher_env(config: Config, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(
        PROXY_REDIS_URL=REDIS_URL,
        PROXY_REDIS_PREFIX=config.redis_prefix,
        PROXY_STORAGE="local",
        PROXY_REFRESH_BATCH="200",
        PROXY_REFRESH_LEASE="2",
        PROXY_REFRESH_INTERVAL="0.2",
        PROXY_REFRESH_HEARTBEAT_FILE=str(tmp_path / "alive"),
        PROXY_LOG_LEVEL="info",
        PROXY_INTERNAL_PORT="0",  # the ops listener, where there is one: any free port
    )
    env.update(extra)
    return env


def count_fresh(config: Config, start: float) -> int:
    with redis.Redis.from_url(REDIS_URL) as client:
        n = client.zcount(Keys(config.redis_prefix).due, fresh_after(config, start), "+inf")
    assert isinstance(n, int)
    return n


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


CRASH_IDS = 10_000  # ~5 s of work for one refresher here (~2 000 ids/s, 2 cores)


@pytest.mark.slow
def test_killed_refresher_loses_no_id(redis_prefix: str, tmp_path: Path) -> None:
    config = make_config(redis_prefix)
    lease = 2.0
    ids = [f"img/{n}.png" for n in range(CRASH_IDS)]
    bulk_seed(config, ids, due_at=time.time() - 1)
    env = refresher_env(config, tmp_path)
    start = time.time()

    with RefresherProcess(env, tmp_path / "first.log") as first:
        wait_until(lambda: count_fresh(config, start) >= 500 or not first.running, 20, "work")
        assert first.running, first.output()
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    done_at_kill = count_fresh(config, start)
    assert 0 < done_at_kill < len(ids)  # killed mid-run
    due = scores(config)
    assert len(due) == len(ids)  # nothing left the index
    leased = sum(1 for s in due.values() if start < s <= time.time() + lease)

    second_start = time.monotonic()
    with RefresherProcess(env, tmp_path / "second.log") as second:
        wait_until(
            lambda: count_fresh(config, start) == len(ids) or not second.running,
            lease + 30,
            "every id to be refreshed",
        )
        assert second.running, second.output()
    took = time.monotonic() - second_start

    due = scores(config)
    assert len(due) == len(ids)
    fresh = fresh_after(config, start)
    assert all(score > fresh for score in due.values()), "an id was left behind"
    assert set(scores(config, "seen")) == set(ids)
    entries = payloads(config, ids)
    assert all(e is not None for e in entries.values()), "a payload was lost"
    stale = [i for i, e in entries.items() if e is not None and e.signed_at < start]
    # Index.store writes the payload before the refresh time, so a SIGKILL between the two
    # leaves the id leased, never an old payload behind a fresh refresh time.
    assert not stale
    print(
        f"killed after {done_at_kill} of {len(ids)} ({leased} leased); second refresher "
        f"finished in {took:.1f}s; {len(stale)} stale payloads"
    )


@pytest.mark.slow
def test_sigterm_drains_and_exits_0_leaving_nothing_claimed(
    redis_prefix: str, tmp_path: Path
) -> None:
    config = make_config(redis_prefix)
    lease, drain = 2.0, 3.0
    ids = [f"img{n}.png" for n in range(4000)]
    bulk_seed(config, ids, due_at=time.time() - 1)
    env = refresher_env(config, tmp_path, PROXY_REFRESH_DRAIN_TIMEOUT=str(drain))
    start = time.time()

    with RefresherProcess(env, tmp_path / "refresher.log") as proc:
        wait_until(lambda: count_fresh(config, start) >= 300 or not proc.running, 20, "work")
        assert proc.proc is not None
        assert proc.running, proc.output()
        proc.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.proc.wait(drain + 5)
        elapsed = time.monotonic() - t0
    assert rc == 0, proc.output()
    assert elapsed < drain + 1

    now = time.time()
    due = scores(config)
    assert len(due) == len(ids)
    fresh = fresh_after(config, start)
    refreshed = {i for i, s in due.items() if s > fresh}
    assert 0 < len(refreshed) < len(ids)  # stopped mid-run
    claimed = [i for i, s in due.items() if i not in refreshed and s > now]
    assert all(due[i] <= now + lease for i in claimed)  # never claimed beyond the lease
    # Drained work was finished completely: every fresh refresh time has its fresh payload.
    entries = payloads(config, sorted(refreshed))
    assert all(e is not None and e.signed_at >= start for e in entries.values())


def run_check(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "proxy_service", "refresher", "--check"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
        check=False,
    ).returncode


@pytest.mark.slow
def test_check_command_follows_the_heartbeat(redis_prefix: str, tmp_path: Path) -> None:
    config = make_config(redis_prefix)
    env = refresher_env(config, tmp_path)
    alive = tmp_path / "alive"
    assert run_check(env) == 1  # no heartbeat file

    with RefresherProcess(env, tmp_path / "refresher.log") as proc:
        wait_until(lambda: alive.exists() or not proc.running, 15, "the heartbeat file")
        assert proc.running, proc.output()
        assert run_check(env) == 0
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0

    stale = time.time() - (3 * 0.2 + 30) - 5
    os.utime(alive, (stale, stale))
    assert run_check(env) == 1
    alive.unlink()
    assert run_check(env) == 1

"""`RedisStore` against a real Redis: payload format, TTLs, and failing soft when Redis breaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis

from proxy_service import store as store_mod
from proxy_service.config import Config
from proxy_service.storage import Entry
from proxy_service.store import MISSING, RedisStore, dumps, loads
from tests.support.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"

ENTRY = Entry(
    key="images/cat.png",
    url="https://bucket.cos.test/images/cat.png?q-signature=get",
    head_url="https://bucket.cos.test/images/cat.png?q-signature=head",
    expires_at=1_700_003_600.5,
    signed_at=1_700_000_000.25,
)


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
def raw(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    return private_redis


def shared(prefix: str, **changes: Any) -> Config:
    # A generous timeout: the shared server may be busy with other tests, and these tests are
    # about the data, not about failing soft (the private-server tests below cover that).
    base: dict[str, Any] = {"redis_timeout": 2.0}
    base.update(changes)
    return Config(redis_url=REDIS_URL, redis_prefix=prefix, **base)


def private(server: RedisServer, **changes: Any) -> Config:
    base: dict[str, Any] = {"redis_timeout": 0.1, "redis_backoff": 0.3}
    base.update(changes)
    return Config(redis_url=server.url, redis_prefix="p:", **base)


def run_with(config: Config, body: Callable[[RedisStore], Awaitable[None]]) -> None:
    """Run `body(store)` in a fresh event loop and close the store inside that same loop."""

    async def main() -> None:
        store = RedisStore(config)
        try:
            await body(store)
        finally:
            await store.aclose()

    asyncio.run(main())


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - start


# -- payload format ---------------------------------------------------------------------------


def test_dumps_is_orjson_of_the_five_fields_and_loads_inverts_it() -> None:
    payload = dumps(ENTRY)
    assert orjson.loads(payload) == {
        "key": ENTRY.key,
        "url": ENTRY.url,
        "head_url": ENTRY.head_url,
        "expires_at": ENTRY.expires_at,
        "signed_at": ENTRY.signed_at,
    }
    assert loads(payload) == ENTRY
    assert loads(b'{"missing":true}') == MISSING


def test_loads_accepts_integer_timestamps_as_floats() -> None:
    payload = orjson.dumps(
        {"key": "k", "url": "u", "head_url": "h", "expires_at": 20, "signed_at": 10}
    )
    entry = loads(payload)
    assert entry == Entry("k", "u", "h", 20.0, 10.0)
    assert isinstance(entry, Entry)
    assert isinstance(entry.expires_at, float)


GARBAGE = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b"42",
    b'"a string"',
    b"null",
    b"{}",
    b'{"missing":false}',
    b'{"missing":"yes"}',
    b'{"key":"k","url":"u","head_url":"h","expires_at":1.0}',
    b'{"key":1,"url":"u","head_url":"h","expires_at":1.0,"signed_at":1.0}',
    b'{"key":"k","url":null,"head_url":"h","expires_at":1.0,"signed_at":1.0}',
    b'{"key":"k","url":"u","head_url":["h"],"expires_at":1.0,"signed_at":1.0}',
    b'{"key":"k","url":"u","head_url":"h","expires_at":"soon","signed_at":1.0}',
    b'{"key":"k","url":"u","head_url":"h","expires_at":null,"signed_at":1.0}',
    b'{"key":"k","url":"u","head_url":"h","expires_at":1.0,"signed_at":{}}',
]


@pytest.mark.parametrize("payload", GARBAGE)
def test_loads_reads_garbage_as_none(payload: bytes) -> None:
    assert loads(payload) is None


# -- against the shared Redis -----------------------------------------------------------------


def test_put_get_round_trip_with_raw_bytes_and_ttl(prefix: str, raw: redis.Redis) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 30.0)
        assert await store.get("cat") == ENTRY
        key = f"{prefix}url:cat"
        assert store.keys.url("cat") == key
        stored = raw.get(key)
        assert stored == dumps(ENTRY)
        assert orjson.loads(stored) == {
            "key": ENTRY.key,
            "url": ENTRY.url,
            "head_url": ENTRY.head_url,
            "expires_at": ENTRY.expires_at,
            "signed_at": ENTRY.signed_at,
        }
        assert 29_000 < raw.pttl(key) <= 30_000
        assert store.errors == 0
        assert store.up

    run_with(shared(prefix), body)


def test_ttl_is_kept_to_the_millisecond(prefix: str, raw: redis.Redis) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("a", ENTRY, 1.5)
        await store.put("b", ENTRY, 3600.0)
        assert 1_000 < raw.pttl(store.keys.url("a")) <= 1_500
        assert 3_599_000 < raw.pttl(store.keys.url("b")) <= 3_600_000

    run_with(shared(prefix), body)


def test_put_overwrites_and_resets_ttl(prefix: str, raw: redis.Redis) -> None:
    other = Entry("images/dog.png", "https://x/dog", "https://x/dog-head", 5.0, 1.0)

    async def body(store: RedisStore) -> None:
        await store.put("pet", ENTRY, 2.0)
        await store.put("pet", other, 60.0)
        assert await store.get("pet") == other
        assert raw.pttl(store.keys.url("pet")) > 59_000

    run_with(shared(prefix), body)


@pytest.mark.parametrize("ttl", [0.0, -5.0, 0.0004])
def test_non_positive_ttl_is_not_stored(prefix: str, raw: redis.Redis, ttl: float) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, ttl)
        await store.put_missing("gone", ttl)
        assert raw.exists(store.keys.url("cat"), store.keys.url("gone")) == 0
        assert await store.get("cat") is None
        assert store.errors == 0

    run_with(shared(prefix), body)


def test_entries_expire_with_their_ttl(prefix: str) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 0.1)
        assert await store.get("cat") == ENTRY
        await asyncio.sleep(0.15)
        assert await store.get("cat") is None

    run_with(shared(prefix), body)


def test_negative_entry_reads_back_as_missing(prefix: str, raw: redis.Redis) -> None:
    async def body(store: RedisStore) -> None:
        await store.put_missing("gone", 10.0)
        assert await store.get("gone") == MISSING
        assert await store.get("gone") is store_mod.MISSING
        assert raw.get(store.keys.url("gone")) == b'{"missing":true}'
        assert 9_000 < raw.pttl(store.keys.url("gone")) <= 10_000

    run_with(shared(prefix), body)


def test_absent_key_is_none(prefix: str) -> None:
    async def body(store: RedisStore) -> None:
        assert await store.get("never-stored") is None
        assert store.errors == 0
        assert store.up

    run_with(shared(prefix), body)


@pytest.mark.parametrize("payload", GARBAGE)
def test_garbage_payload_reads_as_none_without_marking_redis_down(
    prefix: str, raw: redis.Redis, payload: bytes
) -> None:
    async def body(store: RedisStore) -> None:
        raw.set(store.keys.url("junk"), payload, px=10_000)
        assert await store.get("junk") is None
        assert store.errors == 0
        assert store.up
        # A good entry right after still reads fine.
        await store.put("ok", ENTRY, 10.0)
        assert await store.get("ok") == ENTRY

    run_with(shared(prefix), body)


def test_delete_removes_the_key(prefix: str, raw: redis.Redis) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 10.0)
        await store.put_missing("gone", 10.0)
        await store.delete("cat")
        await store.delete("gone")
        await store.delete("never-stored")
        assert await store.get("cat") is None
        assert await store.get("gone") is None
        assert raw.exists(store.keys.url("cat"), store.keys.url("gone")) == 0
        assert store.errors == 0

    run_with(shared(prefix), body)


def test_prefixes_isolate_stores(prefix: str) -> None:
    async def main() -> None:
        a = RedisStore(shared(prefix + "a:"))
        b = RedisStore(shared(prefix + "b:"))
        try:
            await a.put("cat", ENTRY, 10.0)
            assert await a.get("cat") == ENTRY
            assert await b.get("cat") is None
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_ping_on_a_live_server(prefix: str) -> None:
    async def body(store: RedisStore) -> None:
        assert await store.ping() is True
        assert store.up

    run_with(shared(prefix), body)


def test_many_concurrent_operations_share_the_pool(prefix: str) -> None:
    async def body(store: RedisStore) -> None:
        entries = {
            f"id{i}": Entry(f"images/{i}", f"u{i}", f"h{i}", float(i), 0.0) for i in range(200)
        }
        await asyncio.gather(*(store.put(k, e, 10.0) for k, e in entries.items()))
        got = await asyncio.gather(*(store.get(k) for k in entries))
        assert got == list(entries.values())
        assert store.errors == 0

    run_with(shared(prefix), body)


# -- a broken Redis ---------------------------------------------------------------------------


def test_killed_server_fails_fast_then_backs_off(server: RedisServer) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 60.0)
        assert await store.get("cat") == ENTRY
        server.kill()

        value, took = await timed(store.get("cat"))
        assert value is None
        assert took < 0.5
        assert store.errors == 1
        assert store.up is False

        # During the backoff nothing is attempted: no errors are added, and it is instant.
        for op in (store.get("cat"), store.put("cat", ENTRY, 60.0), store.delete("cat")):
            _, took = await timed(op)
            assert took < 0.05
        await store.put_missing("gone", 60.0)
        assert store.errors == 1
        assert store.up is False

        await asyncio.sleep(0.35)
        assert store.up is True
        # After the backoff it tries again, fails again and is down again.
        assert await store.get("cat") is None
        assert store.errors == 2
        assert store.up is False

    run_with(private(server), body)


def test_killed_server_ping_is_false_and_marks_down(server: RedisServer) -> None:
    async def body(store: RedisStore) -> None:
        assert await store.ping() is True
        server.kill()
        assert await store.ping() is False
        assert store.up is False
        assert store.errors == 1

    run_with(private(server), body)


def test_unreachable_from_the_start(server: RedisServer) -> None:
    server.kill()

    async def body(store: RedisStore) -> None:
        value, took = await timed(store.get("cat"))
        assert value is None
        assert took < 0.5
        assert store.up is False
        assert store.errors == 1

    run_with(private(server), body)


def test_store_recovers_after_a_killed_server_restarts(server: RedisServer) -> None:
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 60.0)
        server.kill()
        assert await store.get("cat") is None
        assert store.up is False

        server.start()  # same port, empty data set
        await asyncio.sleep(0.35)
        assert store.up
        assert await store.get("cat") is None
        await store.put("cat", ENTRY, 60.0)
        assert await store.get("cat") == ENTRY
        assert store.errors == 1

    run_with(private(server), body)


def test_ping_ends_the_backoff_early(server: RedisServer) -> None:
    async def body(store: RedisStore) -> None:
        server.kill()
        assert await store.get("cat") is None
        assert store.up is False
        server.start()
        assert await store.ping() is True
        assert store.up is True
        await store.put("cat", ENTRY, 60.0)
        assert await store.get("cat") == ENTRY

    run_with(private(server, redis_backoff=30.0), body)


def test_paused_server_times_out_and_recovers_without_mixing_replies(
    server: RedisServer,
) -> None:
    other = Entry("images/dog.png", "https://x/dog", "https://x/dog-head", 5.0, 1.0)

    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 60.0)
        await store.put("dog", other, 60.0)
        assert await store.get("cat") == ENTRY  # a pooled connection is now open

        server.pause()
        value, took = await timed(store.get("cat"))
        assert value is None
        assert took < 0.4  # redis_timeout is 0.1
        assert store.up is False
        assert store.errors == 1
        # Still paused, still backing off: instant and quiet.
        value, took = await timed(store.get("cat"))
        assert value is None
        assert took < 0.05

        server.resume()
        await asyncio.sleep(0.35)
        assert store.up
        # The reply to the timed-out GET must not be taken as the answer to a later one.
        for _ in range(3):
            assert await store.get("dog") == other
            assert await store.get("cat") == ENTRY
        assert store.errors == 1

    run_with(private(server), body)


def test_paused_server_concurrent_gets_beyond_the_pool_return_none_promptly(
    server: RedisServer,
) -> None:
    # 100 concurrent gets on a pool of 64: the rest wait for a connection at most redis_timeout.
    async def body(store: RedisStore) -> None:
        await store.put("cat", ENTRY, 60.0)
        server.pause()
        start = time.monotonic()
        results = await asyncio.gather(*(store.get("cat") for _ in range(100)))
        assert time.monotonic() - start < 0.5
        assert results == [None] * 100
        assert store.up is False

        server.resume()
        await asyncio.sleep(0.35)
        results = await asyncio.gather(*(store.get("cat") for _ in range(100)))
        assert results == [ENTRY] * 100

    run_with(private(server), body)


def test_paused_server_new_connection_times_out(server: RedisServer) -> None:
    # No pooled connection yet: the connect (and its handshake) hangs instead of the GET.
    server.pause()

    async def body(store: RedisStore) -> None:
        value, took = await timed(store.get("cat"))
        assert value is None
        assert took < 0.4
        _, took = await timed(store.put("cat", ENTRY, 60.0))
        assert took < 0.05
        assert store.up is False
        server.resume()
        await asyncio.sleep(0.35)
        await store.put("cat", ENTRY, 60.0)
        assert await store.get("cat") == ENTRY

    run_with(private(server), body)


def test_paused_server_put_and_delete_never_raise(server: RedisServer) -> None:
    async def body(store: RedisStore) -> None:
        assert await store.ping()
        server.pause()
        _, took = await timed(store.put("cat", ENTRY, 60.0))
        assert took < 0.4
        assert store.up is False
        server.resume()
        await asyncio.sleep(0.35)
        await store.delete("cat")
        server.pause()
        _, took = await timed(store.delete("cat"))
        assert took < 0.4
        assert store.up is False
        assert store.errors == 2
        _, took = await timed(store.ping())
        assert took < 0.4
        assert store.errors == 3
        server.resume()

    run_with(private(server), body)

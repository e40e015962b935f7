"""Proxies kept in step through Redis: purges reach every LRU, accesses reach the refresher."""

from __future__ import annotations

import subprocess
import sys
import time

import redis

from tests.conftest import REDIS_URL, ConfigFactory
from tests.support.cos_server import CosTestServer
from tests.support.http import request
from tests.support.proxy import running
from tests.support.redis_server import RedisServer


def _location(base_url: str) -> str:
    reply = request(base_url + "/images/cat.png")
    assert reply.status == 302
    location = reply.header("location")
    assert location is not None
    return location


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy_service", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_purge_reaches_every_running_proxy(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    cos.put("images/cat.png", b"cat")
    config = cos_config(
        mode="redirect", redis_url=REDIS_URL, redis_prefix=redis_prefix, lru_ttl=3600
    )
    with running(config) as first, running(config) as second:
        old = _location(first.base_url)
        assert _location(second.base_url) == old  # one signing, shared through Redis
        time.sleep(1.1)  # q-sign-time has one-second resolution: a new URL will differ
        env = {"PROXY_REDIS_URL": REDIS_URL, "PROXY_REDIS_PREFIX": redis_prefix}
        result = _cli("purge", "cat.png", env=env)
        assert result.returncode == 0, result.stderr
        # Despite an hour of LRU time, both processes drop the entry within a bounded time.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _location(first.base_url) != old and _location(second.base_url) != old:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a proxy kept serving a purged entry")
        assert _location(first.base_url) == _location(second.base_url)


def test_refresh_command_resigns_and_proxies_follow(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    cos.put("images/cat.png", b"cat")
    config = cos_config(
        mode="redirect", redis_url=REDIS_URL, redis_prefix=redis_prefix, lru_ttl=3600
    )
    env = {
        "PROXY_REDIS_URL": REDIS_URL,
        "PROXY_REDIS_PREFIX": redis_prefix,
        **{k: v for k, v in config.to_env().items() if k.startswith("PROXY_COS_")},
        "PROXY_STORAGE": "cos",
    }
    with running(config) as proxy:
        old = _location(proxy.base_url)
        time.sleep(1.1)
        result = _cli("refresh", "cat.png", env=env)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 5
        while _location(proxy.base_url) == old:
            assert time.monotonic() < deadline, "the proxy never picked up the refreshed URL"
            time.sleep(0.1)
        assert proxy.app.cache.signings == 1  # the new URL came from the refresh, not a re-sign
        assert request(_location(proxy.base_url)).body == b"cat"


def test_admin_commands_refuse_bad_input(redis_prefix: str) -> None:
    env = {"PROXY_REDIS_URL": REDIS_URL, "PROXY_REDIS_PREFIX": redis_prefix}
    bad = _cli("purge", "../etc/passwd", env=env)
    assert bad.returncode == 2
    assert "invalid image id" in bad.stderr
    no_redis = _cli("purge", "cat.png", env={})
    assert no_redis.returncode == 2
    assert "PROXY_REDIS_URL" in no_redis.stderr


def test_purges_missed_while_disconnected_are_covered(
    cos: CosTestServer, cos_config: ConfigFactory, private_redis: RedisServer
) -> None:
    cos.put("images/cat.png", b"cat")
    config = cos_config(
        mode="redirect", redis_url=private_redis.url, redis_backoff=0.2, lru_ttl=3600
    )
    with running(config) as proxy:
        old = _location(proxy.base_url)
        # The subscriber loses its connection; a purge sent meanwhile never reaches it.
        client = redis.Redis.from_url(private_redis.url)
        client.client_kill_filter(_type="pubsub")
        client.delete(config.redis_prefix + "url:cat.png")
        client.close()
        time.sleep(1.1)
        # On resubscribing the proxy clears its LRU, so the purged entry is not served.
        deadline = time.monotonic() + 5
        while _location(proxy.base_url) == old:
            assert time.monotonic() < deadline, "stale entry served after reconnect"
            time.sleep(0.1)


def test_accesses_are_recorded_in_batches(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    cos.put("images/cat.png", b"cat")
    config = cos_config(redis_url=REDIS_URL, redis_prefix=redis_prefix, access_flush_interval=0.3)
    client = redis.Redis.from_url(REDIS_URL)
    seen_key = redis_prefix + "{idx}:seen"
    with running(config) as proxy:
        assert request(proxy.base_url + "/images/cat.png").status == 200
        first = client.zscore(seen_key, "cat.png")
        assert first is not None  # recorded when signed
        time.sleep(0.5)
        for _ in range(20):  # LRU hits: no Redis write each, one flush later
            assert request(proxy.base_url + "/images/cat.png").status == 200
        deadline = time.monotonic() + 3
        while (client.zscore(seen_key, "cat.png") or 0) <= first:
            assert time.monotonic() < deadline, "access was never flushed"
            time.sleep(0.05)
        assert client.zscore(redis_prefix + "{idx}:due", "cat.png") is not None
    client.close()

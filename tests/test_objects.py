"""The small-object cache: hot small images served from memory, never stale beyond its ttl."""

from __future__ import annotations

import time

from proxy_service.config import Config
from proxy_service.objects import ObjectCache
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer, pattern
from tests.support.http import request
from tests.support.proxy import running

BODY = pattern(0, 16 * 1024)


def _origin_gets(cos: CosTestServer, key: str) -> list[int]:
    return [r.status for r in cos.requests if r.key == key and r.method == "GET"]


def test_hot_object_is_served_from_memory_with_full_semantics(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(object_cache_size=1 << 20, object_cache_ttl=60)) as proxy:
        url = proxy.base_url + "/images/cat.png"
        first = request(url)
        replies = [request(url) for _ in range(5)]
        assert _origin_gets(cos, "images/cat.png") == [200]
        drop = {"date"}
        for reply in replies:
            assert reply.body == BODY
            assert {k: v for k, v in reply.headers.items() if k not in drop} == {
                k: v for k, v in first.headers.items() if k not in drop
            }
        head = request(url, method="HEAD")
        assert head.body == b""
        assert head.header("content-length") == str(len(BODY))
        assert head.header("etag") == first.header("etag")

        part = request(url, headers={"Range": "bytes=10-19"})
        assert part.status == 206
        assert part.body == BODY[10:20]
        assert part.header("content-range") == f"bytes 10-19/{len(BODY)}"
        etag = first.header("etag") or ""
        assert request(url, headers={"If-None-Match": etag}).status == 304
        past = request(url, headers={"Range": "bytes=999999-"})
        assert past.status == 416
        assert past.header("content-range") == f"bytes */{len(BODY)}"
        assert past.header("cache-control") == "no-store"
        assert _origin_gets(cos, "images/cat.png") == [200]


def test_replaced_object_is_stale_at_most_the_ttl(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(object_cache_size=1 << 20, object_cache_ttl=0.5)) as proxy:
        url = proxy.base_url + "/images/cat.png"
        assert request(url).body == BODY
        time.sleep(0.6)
        # Unchanged: one conditional GET answered 304, still served from memory.
        assert request(url).body == BODY
        revalidation = cos.requests[-1]
        assert revalidation.headers.get("if-none-match") is not None
        assert revalidation.status == 304
        new = pattern(7, 7 + 16 * 1024)
        time.sleep(1.1)  # a different mtime, so a different ETag
        cos.put("images/cat.png", new)
        replaced_at = time.monotonic()
        while request(url).body != new:
            assert time.monotonic() - replaced_at < 0.5 + 0.5, "stale beyond the ttl"
            time.sleep(0.05)


def test_a_body_arriving_in_many_reads_is_kept_whole(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    # Regression: admission looked at the first socket read only, so a body the network split
    # (here 200 KiB in 16 KiB pieces) was never kept, however small the limit allowed.
    body = pattern(3, 200 * 1024)
    cos.put("images/photo.jpg", body)
    cos.trickle_next(16 * 1024, 0.002)
    with running(cos_config(object_cache_size=1 << 20, object_cache_ttl=60)) as proxy:
        url = proxy.base_url + "/images/photo.jpg"
        first = request(url)
        assert first.body == body
        assert first.header("content-length") == str(len(body))
        assert request(url).body == body
    assert _origin_gets(cos, "images/photo.jpg") == [200]


def test_large_objects_are_not_kept(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    big = pattern(0, 300_000)
    cos.put("images/big.bin", big)
    config = cos_config(object_cache_size=1 << 20, object_cache_max_object=64 * 1024)
    with running(config) as proxy:
        for _ in range(3):
            assert request(proxy.base_url + "/images/big.bin").body == big
    assert _origin_gets(cos, "images/big.bin") == [200, 200, 200]


def test_conditional_first_requests_are_not_admitted(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(object_cache_size=1 << 20, object_cache_ttl=60)) as proxy:
        url = proxy.base_url + "/images/cat.png"
        assert request(url, headers={"Range": "bytes=0-9"}).body == BODY[:10]
        assert request(url).body == BODY  # the partial answer was not taken for the object
        assert request(url).body == BODY
    assert _origin_gets(cos, "images/cat.png") == [206, 200]


def test_memory_is_bounded_lru() -> None:
    cache = ObjectCache(Config(object_cache_size=100, object_cache_max_object=60))
    meta = [(b"etag", b'"x"'), (b"content-type", b"image/png")]
    cache.admit("a", meta, b"a" * 40, 0.0)
    cache.admit("b", meta, b"b" * 40, 0.0)
    assert cache.get("a") is not None  # a is now the most recent
    cache.admit("c", meta, b"c" * 40, 0.0)
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.size_bytes == 80
    cache.admit("huge", meta, b"h" * 61, 0.0)
    assert cache.get("huge") is None
    cache.admit("no-validator", [(b"content-type", b"image/png")], b"n", 0.0)
    assert cache.get("no-validator") is None  # nothing to revalidate it with: not kept

"""The hot path end to end: a real uvicorn serving the proxy, the COS test origin behind it."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis

from tests.conftest import REDIS_URL, ConfigFactory
from tests.support.cos_server import CosTestServer, pattern
from tests.support.http import raw_request, request
from tests.support.proxy import ThreadedProxy, running
from tests.support.redis_server import RedisServer

KEY = "images/cat.png"
BODY = pattern(0, 300_000)


@pytest.fixture
def proxy(cos: CosTestServer, cos_config: ConfigFactory) -> Iterator[ThreadedProxy]:
    cos.put(KEY, BODY)
    with running(cos_config()) as p:
        yield p


def test_streams_object_with_validators_and_cache_policy(
    proxy: ThreadedProxy, cos: CosTestServer
) -> None:
    cos.extra_headers = {
        "Set-Cookie": "session=1",
        "Content-Disposition": "attachment; filename=x.png",
        "Cache-Control": "private, max-age=5",
    }
    reply = request(proxy.base_url + "/images/cat.png")
    assert reply.status == 200
    assert reply.body == BODY
    assert reply.header("content-type") == "image/png"
    assert reply.header("content-length") == str(len(BODY))
    assert (
        reply.header(
            "etag",
        )
        is not None
    )
    assert reply.header("last-modified") is not None
    assert reply.header("accept-ranges") == "bytes"
    assert reply.header("cache-control") == "public, max-age=86400"
    assert reply.header("date") is not None
    for leaked in ("set-cookie", "content-disposition", "server", "x-cos-request-id"):
        assert leaked not in reply.headers
    assert not any(name.startswith("x-cos") for name in reply.headers)


def test_head_is_signed_for_head_and_has_get_headers(
    proxy: ThreadedProxy, cos: CosTestServer
) -> None:
    get = request(proxy.base_url + "/images/cat.png")
    head = request(proxy.base_url + "/images/cat.png", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    drop = {"date"}
    assert {k: v for k, v in head.headers.items() if k not in drop} == {
        k: v for k, v in get.headers.items() if k not in drop
    }
    assert [r.method for r in cos.requests if r.status == 200] == ["GET", "HEAD"]


def test_range_conditional_and_unsatisfiable(proxy: ThreadedProxy) -> None:
    url = proxy.base_url + "/images/cat.png"
    part = request(url, headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.body == BODY[100:200]
    assert part.header("content-range") == f"bytes 100-199/{len(BODY)}"

    etag = request(url, method="HEAD").header("etag")
    assert etag is not None
    cached = request(url, headers={"If-None-Match": etag})
    assert cached.status == 304
    assert cached.body == b""
    assert cached.header("etag") == etag
    assert cached.header("cache-control") == "public, max-age=86400"

    stale_range = request(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale_range.status == 200
    assert stale_range.body == BODY

    past_end = request(url, headers={"Range": f"bytes={len(BODY) + 10}-"})
    assert past_end.status == 416
    assert past_end.header("content-range") == f"bytes */{len(BODY)}"
    assert past_end.header("cache-control") == "no-store"


@pytest.mark.parametrize(
    "path",
    [
        b"/images/..%2Fsecret",
        b"/images/a%2Fb",
        b"/images/a//b",
        b"/images/../etc/passwd",
        b"/images/.env",
        b"/images/a%00b",
        b"/images/%E2%80%AEcat.png",
        b"/images/" + b"a" * 300,
    ],
)
def test_bad_ids_are_400_and_never_reach_storage(
    proxy: ThreadedProxy, cos: CosTestServer, path: bytes
) -> None:
    reply = raw_request("127.0.0.1", proxy.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"cache-control: no-store" in head.lower()
    assert body == b"invalid image id\n"
    assert cos.requests == []


def test_other_methods_and_paths(proxy: ThreadedProxy) -> None:
    post = request(proxy.base_url + "/images/cat.png", method="POST")
    assert post.status == 405
    assert post.header("allow") == "GET, HEAD"
    assert post.header("cache-control") == "no-store"
    assert request(proxy.base_url + "/metrics").status == 404
    assert request(proxy.base_url + "/").status == 404


def test_unknown_id_is_404_and_negatively_cached(proxy: ThreadedProxy, cos: CosTestServer) -> None:
    for _ in range(3):
        reply = request(proxy.base_url + "/images/nope.png")
        assert reply.status == 404
        assert reply.header("cache-control") == "public, max-age=60"
        assert reply.body == b"not found\n"
    assert len(cos.requests) == 1  # the next two were answered from the negative cache


def test_url_cache_tiers_and_single_flight(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    cos.put(KEY, BODY)
    config = cos_config(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    with running(config) as first:
        with ThreadPoolExecutor(32) as pool:
            replies = list(
                pool.map(lambda _: request(first.base_url + "/images/cat.png"), range(32))
            )
        assert {r.status for r in replies} == {200}
        assert first.app.cache.signings == 1  # 32 concurrent misses, one signing
        with redis.Redis.from_url(REDIS_URL) as client:
            raw = client.get(redis_prefix + "url:cat.png")
        assert isinstance(raw, bytes)
        payload = orjson.loads(raw)
        assert payload["key"] == KEY
        assert payload["expires_at"] > time.time() + 3000
        assert "q-signature=" in payload["url"]
    # A second replica finds the URL in Redis and never signs.
    with running(config) as second:
        assert request(second.base_url + "/images/cat.png").body == BODY
        assert second.app.cache.signings == 0


def test_expired_cached_url_is_resigned_and_retried(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    cos.put(KEY, BODY)
    # A URL that COS will refuse as expired, cached as if it were still good.
    stale = cos.presign(KEY, expires=1)
    client = redis.Redis.from_url(REDIS_URL)
    now = time.time()
    client.set(
        redis_prefix + "url:cat.png",
        orjson.dumps(
            {
                "key": KEY,
                "url": stale,
                "head_url": stale,
                "expires_at": now + 3600,
                "signed_at": now,
            }
        ),
    )
    client.close()
    cos.wait_until(lambda: time.time() > now + 1.5, timeout=5)
    with running(cos_config(redis_url=REDIS_URL, redis_prefix=redis_prefix)) as proxy:
        reply = request(proxy.base_url + "/images/cat.png")
        assert reply.status == 200
        assert reply.body == BODY
        assert [r.status for r in cos.requests] == [403, 200]
        assert proxy.app.cache.signings == 1
        # The fresh URL replaced the stale one for everybody.
        assert request(proxy.base_url + "/images/cat.png").status == 200
        assert proxy.app.cache.signings == 1


def test_wrong_credentials_end_in_502_not_a_loop(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(cos_secret_key="wrong-secret-value")) as proxy:
        reply = request(proxy.base_url + "/images/cat.png")
    assert reply.status == 502
    assert reply.header("cache-control") == "no-store"
    assert reply.body == b"upstream error\n"
    assert b"wrong-secret" not in reply.body
    assert [r.status for r in cos.requests] == [403, 403]


def test_upstream_5xx_is_retried_then_502(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(upstream_retries=2)) as proxy:
        cos.fail_next(503, count=2)
        assert request(proxy.base_url + "/images/cat.png").body == BODY
        cos.fail_next(500, count=3)
        reply = request(proxy.base_url + "/images/cat.png")
    assert reply.status == 502
    assert reply.header("cache-control") == "no-store"
    assert [r.status for r in cos.requests] == [503, 503, 200, 500, 500, 500]


def test_dropped_connections_are_retried(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(upstream_retries=1)) as proxy:
        cos.drop_next(1)
        assert request(proxy.base_url + "/images/cat.png").body == BODY


def test_stalled_origin_is_504(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(upstream_read_timeout=0.3, upstream_retries=1)) as proxy:
        cos.stall_next(2.0, count=2)
        started = time.monotonic()
        reply = request(proxy.base_url + "/images/cat.png")
        elapsed = time.monotonic() - started
    assert reply.status == 504
    assert reply.header("cache-control") == "no-store"
    assert reply.body == b"upstream timeout\n"
    assert elapsed < 1.9  # two attempts of 0.3 s, not the origin's 2 s stall


def test_origin_unreachable_is_502(cos_config: ConfigFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        with running(cos_config(cos_domain=dead, upstream_retries=1)) as proxy:
            reply = request(proxy.base_url + "/images/cat.png")
    assert reply.status == 502
    assert reply.header("cache-control") == "no-store"


def test_failure_after_first_byte_drops_the_connection(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    big = "images/big.bin"
    cos.put_pattern(big, 4 * 1024 * 1024)
    with running(cos_config()) as proxy:
        cos.abort_next_after(1024 * 1024)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/images/big.bin")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-length") == str(4 * 1024 * 1024)
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        cos.wait_until(lambda: proxy.app.origin.in_flight == 0)


def test_client_disconnect_releases_the_upstream_connection(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put_pattern("images/big.bin", 64 * 1024 * 1024)
    with running(cos_config()) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /images/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            received = 0
            while received < 1024 * 1024:
                received += len(sock.recv(65536))
        # Closed after 1 MiB of 64: the proxy must stop pulling and free its upstream connection.
        cos.wait_until(lambda: proxy.app.origin.in_flight == 0, timeout=5)
        cos.wait_until(lambda: cos.open_streams == 0, timeout=5)
        assert cos.aborted_streams == 1
        assert cos.completed_streams == 0
        # And the proxy keeps serving.
        assert request(proxy.base_url + "/images/big.bin", headers={"Range": "bytes=0-9"}).body == (
            pattern(0, 10)
        )


def test_redirect_mode(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(mode="redirect", redirect_max_age=120)) as proxy:
        reply = request(proxy.base_url + "/images/cat.png")
        assert reply.status == 302
        assert reply.header("cache-control") == "public, max-age=120"
        location = reply.header("location")
        assert location is not None
        assert location.startswith(cos.base_url + "/images/cat.png?")
        assert request(location).body == BODY
        head = request(proxy.base_url + "/images/cat.png", method="HEAD")
        head_location = head.header("location")
        assert head_location is not None
        assert head_location != location
        assert request(head_location, method="HEAD").status == 200


def test_redirect_cache_never_outlives_the_url(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put(KEY, BODY)
    config = cos_config(mode="redirect", redirect_max_age=100_000, sign_expires=900)
    with running(config) as proxy:
        reply = request(proxy.base_url + "/images/cat.png")
    max_age = int((reply.header("cache-control") or "").rpartition("=")[2])
    assert 0 < max_age <= 900 - config.expiry_margin


def test_mode_per_request_when_allowed(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put(KEY, BODY)
    with running(cos_config(allow_mode_override=True)) as proxy:
        assert request(proxy.base_url + "/images/cat.png").status == 200
        assert request(proxy.base_url + "/images/cat.png?mode=redirect").status == 302
        assert request(proxy.base_url + "/images/cat.png?mode=stream").status == 200
        assert request(proxy.base_url + "/images/cat.png?mode=zzz").status == 400
    with running(cos_config()) as proxy:  # not allowed: the query is ignored
        assert request(proxy.base_url + "/images/cat.png?mode=redirect").status == 200


def test_local_storage_refuses_redirect_clearly(tmp_path: Path) -> None:
    from proxy_service.config import Config

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    with running(Config(local_root=str(tmp_path), allow_mode_override=True)) as proxy:
        assert request(proxy.base_url + "/images/a.png").body == b"png"
        reply = request(proxy.base_url + "/images/a.png?mode=redirect")
    assert reply.status == 400
    assert reply.body == b"redirect mode is not available for this storage\n"


def test_redis_failure_never_becomes_a_5xx(
    cos: CosTestServer, cos_config: ConfigFactory, private_redis: RedisServer
) -> None:
    cos.put(KEY, BODY)
    cos.put("images/dog.png", b"dog")
    with running(cos_config(redis_url=private_redis.url, redis_timeout=0.1)) as proxy:
        assert request(proxy.base_url + "/images/cat.png").status == 200
        private_redis.pause()  # hung: connections open, nothing answers
        started = time.monotonic()
        assert request(proxy.base_url + "/images/dog.png").body == b"dog"
        assert time.monotonic() - started < 1.0
        private_redis.resume()
        private_redis.kill()  # gone
        cos.put("images/cow.png", b"cow")
        assert request(proxy.base_url + "/images/cow.png").body == b"cow"
        assert request(proxy.base_url + "/images/cat.png").body == BODY


def test_concurrent_streams_share_a_bounded_pool(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put_pattern("images/mid.bin", 2 * 1024 * 1024)
    with running(cos_config(upstream_pool_size=4)) as proxy:
        errors: list[BaseException] = []

        def fetch() -> None:
            try:
                assert request(proxy.base_url + "/images/mid.bin").body == pattern(0, 2 << 20)
            except BaseException as exc:  # collected and re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert proxy.app.origin.in_flight == 0


def test_cache_hits_make_no_redis_round_trip(
    cos: CosTestServer, cos_config: ConfigFactory, private_redis: RedisServer
) -> None:
    """The URL's first use signs and stores it in Redis; hits after that, in either mode, are
    answered from the process's LRU: the Redis server sees no command per request (access records
    for the refresher go out in one batch every `access_flush_interval`)."""
    cos.put("images/cat.png", BODY)
    client = redis.Redis.from_url(private_redis.url)

    def commands() -> int:
        stats = client.info("commandstats")
        return sum(s["calls"] for name, s in stats.items() if name != "cmdstat_info")

    config = cos_config(redis_url=private_redis.url, allow_mode_override=True)
    with running(config) as proxy:
        url = proxy.base_url + "/images/cat.png"
        assert request(url).body == BODY  # miss: signed, stored in Redis
        before = commands()
        for _ in range(100):
            assert request(url).body == BODY
            assert request(url + "?mode=redirect").status == 302
        during = commands() - before
    client.close()
    assert during < 10, f"{during} Redis commands for 200 cache hits"

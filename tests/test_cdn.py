"""The proxy as an origin for HTTP caches (RFC 9110/9111), then behind a real one.

First over plain HTTP against the proxy on the COS test origin: what a cache needs from us that
tests/test_handler.py does not already cover. Then nginx with `proxy_cache` and `slice` in front
(the README's "Behind a CDN" configuration): hits that never reach us, revalidation with our 304,
byte-exact ranges across slices, and errors that are never cached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy_service.config import Config
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer, pattern
from tests.support.http import Reply, request
from tests.support.nginx import NGINX_CACHE_CONF, Nginx, require_nginx
from tests.support.proxy import ThreadedProxy, running

KEY = "images/cat.png"
BODY = pattern(0, 300_000)
POLICY = "public, max-age=1234, immutable"  # not the default: it must come from the config


@pytest.fixture
def origin(cos: CosTestServer, cos_config: ConfigFactory) -> Iterator[ThreadedProxy]:
    cos.put(KEY, BODY)
    with running(cos_config(cache_control=POLICY, not_found_max_age=7)) as proxy:
        yield proxy


def direct(cos: CosTestServer, key: str = KEY) -> Reply:
    """The object as COS itself serves it (for its validators)."""
    return request(cos.presign(key))


def without_date(reply: Reply) -> dict[str, str]:
    return {k: v for k, v in reply.headers.items() if k != "date"}


# -- origin semantics --------------------------------------------------------------------------


def test_success_statuses_carry_the_objects_validators_and_the_configured_policy(
    origin: ThreadedProxy, cos: CosTestServer
) -> None:
    cos_reply = direct(cos)
    etag, last_modified = cos_reply.header("etag"), cos_reply.header("last-modified")
    assert etag is not None
    assert last_modified is not None
    assert not etag.startswith("W/")  # strong: usable for If-Range and slice consistency
    url = origin.base_url + "/images/cat.png"
    cases = {
        200: {},
        206: {"Range": "bytes=10-19"},
        304: {"If-None-Match": etag},
    }
    for status, headers in cases.items():
        for method in ("GET", "HEAD"):
            reply = request(url, method=method, headers=headers)
            # A HEAD ignores Range (RFC 9110 §14.2): the 206 case is a 200 for it.
            expected = 200 if method == "HEAD" and status == 206 else status
            assert reply.status == expected, (method, headers)
            assert reply.header("etag") == etag
            assert reply.header("last-modified") == last_modified
            assert reply.header("cache-control") == POLICY
            if status != 304:
                assert reply.header("accept-ranges") == "bytes"
    # If-Modified-Since with the object's own date is a 304 too.
    by_date = request(url, headers={"If-Modified-Since": last_modified})
    assert by_date.status == 304
    assert by_date.header("cache-control") == POLICY


def test_304_is_empty_and_carries_what_a_cache_refreshes_with(
    origin: ThreadedProxy, cos: CosTestServer
) -> None:
    etag = direct(cos).header("etag")
    assert etag is not None
    reply = request(origin.base_url + "/images/cat.png", headers={"If-None-Match": f'"x", {etag}'})
    assert reply.status == 304
    assert reply.body == b""
    assert reply.header("content-length") in (None, "0")
    assert {"etag", "cache-control", "date"} <= reply.headers.keys()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}, 200),
        # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2): a changed ETag is a 200
        # even when the date alone would say "not modified".
        ({"If-None-Match": '"other"', "If-Modified-Since": "LM"}, 200),
        ({"If-None-Match": "*"}, 304),
    ],
)
def test_conditionals_are_evaluated_like_rfc_9110(
    origin: ThreadedProxy, cos: CosTestServer, headers: dict[str, str], status: int
) -> None:
    last_modified = direct(cos).header("last-modified")
    assert last_modified is not None
    headers = {k: last_modified if v == "LM" else v for k, v in headers.items()}
    reply = request(origin.base_url + "/images/cat.png", headers=headers)
    assert reply.status == status
    assert reply.body == (BODY if status == 200 else b"")


def test_multiple_ranges_are_answered_with_the_whole_object(origin: ThreadedProxy) -> None:
    reply = request(origin.base_url + "/images/cat.png", headers={"Range": "bytes=0-9,100-109"})
    assert reply.status == 200  # RFC 9110 14.2: a server may ignore a Range
    assert reply.body == BODY
    assert reply.header("content-range") is None
    assert reply.header("content-length") == str(len(BODY))
    assert reply.header("cache-control") == POLICY


@pytest.mark.parametrize(
    ("validator", "status"),
    [("etag", 206), ("last-modified", 206), ("weak-etag", 200), ("old-date", 200)],
)
def test_if_range_is_honoured(
    origin: ThreadedProxy, cos: CosTestServer, validator: str, status: int
) -> None:
    cos_reply = direct(cos)
    values = {
        "etag": cos_reply.header("etag"),
        "last-modified": cos_reply.header("last-modified"),
        "weak-etag": f"W/{cos_reply.header('etag')}",  # never matches for If-Range
        "old-date": "Mon, 01 Jan 2001 00:00:00 GMT",
    }
    if_range = values[validator]
    assert if_range is not None
    reply = request(
        origin.base_url + "/images/cat.png",
        headers={"Range": "bytes=1000-1999", "If-Range": if_range},
    )
    assert reply.status == status
    if status == 206:
        assert reply.body == BODY[1000:2000]
        assert reply.header("content-range") == f"bytes 1000-1999/{len(BODY)}"
    else:
        assert reply.body == BODY
        assert reply.header("content-range") is None


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/images/cat.png", {"Range": "bytes=5-14"}, 206),
        ("/images/cat.png", {"Range": "bytes=0-1,5-6"}, 200),
        ("/images/cat.png", {"If-None-Match": "*"}, 304),
        ("/images/cat.png", {"Range": "bytes=999999-"}, 416),
        ("/images/nope.png", {}, 404),
        ("/favicon.ico", {}, 404),
        ("/images/.env", {}, 400),
    ],
)
def test_head_has_exactly_gets_headers(
    origin: ThreadedProxy, path: str, headers: dict[str, str], status: int
) -> None:
    get = request(origin.base_url + path, headers=headers)
    assert get.status == status
    # RFC 9110 §14.2: range handling is defined for GET only, so HEAD ignores Range and answers
    # exactly what a GET without it would.
    plain = {k: v for k, v in headers.items() if k != "Range"}
    expected = get if plain == headers else request(origin.base_url + path, headers=plain)
    head = request(origin.base_url + path, method="HEAD", headers=headers)
    assert head.status == expected.status
    assert head.body == b""
    assert without_date(head) == without_date(expected)


@pytest.mark.parametrize(
    ("path", "headers", "status", "cache_control"),
    [
        ("/images/cat.png", {}, 200, POLICY),
        ("/images/cat.png", {"Range": "bytes=0-0"}, 206, POLICY),
        ("/images/cat.png", {"If-None-Match": "*"}, 304, POLICY),
        ("/images/nope.png", {}, 404, "public, max-age=7"),  # PROXY_NOT_FOUND_MAX_AGE
        ("/not-an-image", {}, 404, "no-store"),
        ("/images/a//b", {}, 400, "no-store"),
        ("/images/cat.png", {"Range": "bytes=400000-"}, 416, "no-store"),
        ("/images/cat.png?fault=1", {}, 502, "no-store"),
    ],
)
def test_every_status_has_a_date_no_vary_and_its_cache_policy(
    origin: ThreadedProxy,
    cos: CosTestServer,
    path: str,
    headers: dict[str, str],
    status: int,
    cache_control: str,
) -> None:
    if status == 502:
        cos.fail_next(500, count=3)  # the first attempt and both retries
    reply = request(origin.base_url + path, headers=headers)
    assert reply.status == status
    assert reply.header("date") is not None
    assert reply.header("vary") is None
    assert reply.header("cache-control") == cache_control


def test_the_representation_does_not_vary_with_accept_encoding(origin: ThreadedProxy) -> None:
    # Why no `Vary: Accept-Encoding`: the bytes are relayed as stored, whatever the client takes.
    url = origin.base_url + "/images/cat.png"
    plain = request(url)
    for accept in ("gzip, deflate, br, zstd", "identity", "*"):
        other = request(url, headers={"Accept-Encoding": accept})
        assert other.body == plain.body
        assert without_date(other) == without_date(plain)


# -- behind a real caching proxy ---------------------------------------------------------------


@contextlib.contextmanager
def behind_nginx(tmp_path: Path, config: Config) -> Iterator[Nginx]:
    """The proxy with `config`, and nginx caching it: the client talks to the yielded nginx."""
    require_nginx()
    with running(config) as proxy, Nginx(tmp_path / "nginx", proxy.port) as cdn:
        yield cdn


def origin_gets(cos: CosTestServer, key: str = KEY) -> list[tuple[str | None, int]]:
    """(Range, status) of every request the COS origin saw for `key`."""
    return [(r.headers.get("range"), r.status) for r in cos.requests if r.key == key]


def wait_until_stale(fetched_at: float, max_age: int) -> None:
    # nginx stores `now + max-age` in whole seconds and serves until that second has passed.
    deadline = int(fetched_at) + max_age + 1.05
    CosTestServer.wait_until(lambda: time.time() >= deadline, timeout=max_age + 3)


def test_second_request_is_a_cache_hit_that_never_reaches_the_proxy(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put(KEY, BODY)
    etag = direct(cos).header("etag")
    cos.reset()
    with behind_nginx(tmp_path, cos_config()) as cdn:
        url = cdn.base_url + "/images/cat.png"
        first = request(url)
        second = request(url)
        head = request(url, method="HEAD")
        log = cdn.access_log(3)
    assert first.status == second.status == head.status == 200
    assert first.body == second.body == BODY
    assert [r.header("x-cache-status") for r in (first, second, head)] == ["MISS", "HIT", "HIT"]
    for reply in (first, second, head):
        assert reply.header("etag") == etag
        assert reply.header("cache-control") == "public, max-age=86400"
        assert reply.header("content-length") == str(len(BODY))
    # One request reached the proxy (the first slice), none after it.
    assert [e["upstream"] for e in log] == ["206", "-", "-"]
    assert origin_gets(cos) == [("bytes=0-1048575", 206)]


def test_expired_entry_is_revalidated_with_a_304_from_the_proxy(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put(KEY, BODY)
    validators = direct(cos)
    cos.reset()
    # Our max-age=1 decides the freshness: nginx has no proxy_cache_valid of its own.
    with behind_nginx(tmp_path, cos_config(cache_control="public, max-age=1")) as cdn:
        url = cdn.base_url + "/images/cat.png"
        first = request(url)
        fetched_at = time.time()
        assert first.header("x-cache-status") == "MISS"
        wait_until_stale(fetched_at, 1)
        revalidated = request(url)
        again = request(url)
        log = cdn.access_log(3)
    assert revalidated.status == 200
    assert revalidated.header("x-cache-status") == "REVALIDATED"
    assert revalidated.body == BODY
    assert again.header("x-cache-status") == "HIT"  # the 304's max-age made it fresh again
    assert [e["upstream"] for e in log] == ["206", "304", "-"]
    # The conditional request went through the proxy to COS, which answered 304.
    conditional = cos.requests[-1]
    assert conditional.status == 304
    assert conditional.headers.get("if-none-match") == validators.header("etag")
    assert conditional.headers.get("if-modified-since") == validators.header("last-modified")
    assert conditional.headers.get("range") == "bytes=0-1048575"
    assert len(cos.requests) == 2


def test_ranges_through_the_slice_module_are_byte_exact(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    size = 3 * 1024 * 1024 + 512 * 1024  # 3.5 MiB: three whole 1 MiB slices and a half one
    cos.put_pattern("images/big.bin", size)
    mib = 1024 * 1024
    ranges = [
        (mib - 10, mib + 10),  # crosses the first slice boundary: two slices, MISS
        (0, 100),  # HIT: slice 0 is cached now
        (mib * 2 - 1, mib * 3 + 1),  # crosses two boundaries
        (size - 100, size),  # the tail of the half slice
        (12345, size),  # open-ended, four slices
    ]
    with behind_nginx(tmp_path, cos_config()) as cdn:
        url = cdn.base_url + "/images/big.bin"
        for start, stop in ranges:
            spec = f"bytes={start}-" if stop == size else f"bytes={start}-{stop - 1}"
            reply = request(url, headers={"Range": spec})
            assert reply.status == 206, spec
            assert reply.header("content-range") == f"bytes {start}-{stop - 1}/{size}"
            assert reply.body == pattern(start, stop), spec
        suffix = request(url, headers={"Range": "bytes=-70000"})
        assert suffix.body == pattern(size - 70000, size)
        whole = request(url)
        assert whole.status == 200
        assert whole.header("x-cache-status") == "HIT"
        assert whole.body == pattern(0, size)
    # The proxy only ever saw whole, aligned slices, each exactly once.
    slices = [f"bytes={n * mib}-{(n + 1) * mib - 1}" for n in range(4)]
    assert sorted(origin_gets(cos, "images/big.bin")) == sorted((s, 206) for s in slices)


@pytest.mark.parametrize("fault", ["fail", "stall"])
def test_errors_from_the_proxy_are_never_cached(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory, fault: str
) -> None:
    cos.put(KEY, BODY)
    with behind_nginx(tmp_path, cos_config(upstream_retries=0, upstream_read_timeout=0.3)) as cdn:
        url = cdn.base_url + "/images/cat.png"
        if fault == "fail":
            cos.fail_next(500, count=2)
        else:
            cos.stall_next(1.0, count=2)
        failed = [request(url), request(url)]
        recovered = request(url)
        cached = request(url)
        log = cdn.access_log(4)
    status, body = (502, b"upstream error\n") if fault == "fail" else (504, b"upstream timeout\n")
    # Both errors came from the proxy: nginx did not answer the second from its cache ...
    assert [(e["status"], e["cache"], e["upstream"]) for e in log[:2]] == [
        (str(status), "MISS", str(status))
    ] * 2
    assert [(r.status, r.body, r.header("cache-control")) for r in failed] == [
        (status, body, "no-store")
    ] * 2
    # ... and once the origin recovers, the object is served, then cached.
    assert recovered.status == 200
    assert recovered.body == BODY
    assert [recovered.header("x-cache-status"), cached.header("x-cache-status")] == ["MISS", "HIT"]


def test_not_found_is_cached_only_for_its_short_max_age(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    with behind_nginx(tmp_path, cos_config(not_found_max_age=1, negative_ttl=0)) as cdn:
        url = cdn.base_url + "/images/new.png"
        first = request(url)
        fetched_at = time.time()
        second = request(url)
        cos.put("images/new.png", b"new image")  # uploaded while the CDN remembers the 404
        wait_until_stale(fetched_at, 1)
        after = request(url)
        log = cdn.access_log(3)
    assert [first.status, second.status, after.status] == [404, 404, 200]
    assert [e["cache"] for e in log] == ["MISS", "HIT", "EXPIRED"]
    assert after.body == b"new image"


def test_the_cache_key_includes_the_query_string(
    tmp_path: Path, cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put(KEY, BODY)
    with behind_nginx(tmp_path, cos_config(allow_mode_override=True)) as cdn:
        url = cdn.base_url + "/images/cat.png"
        redirect = request(url + "?mode=redirect")
        stream = request(url)
        redirect_again = request(url + "?mode=redirect")
        stream_again = request(url)
    assert (redirect.status, redirect.header("x-cache-status")) == (302, "MISS")
    assert (stream.status, stream.header("x-cache-status")) == (200, "MISS")
    assert stream.body == BODY
    assert (redirect_again.status, redirect_again.header("x-cache-status")) == (302, "HIT")
    assert redirect_again.header("location") == redirect.header("location")
    assert (stream_again.status, stream_again.header("x-cache-status")) == (200, "HIT")


def test_readme_shows_the_configuration_tested_here() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert NGINX_CACHE_CONF.format(slice="1m") in readme

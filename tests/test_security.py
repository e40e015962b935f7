"""Hostile input, limits and secrets, end to end: a real uvicorn serving the proxy with the COS
test origin (which records every request it gets) behind it."""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy_service import errors, signing
from proxy_service.config import Config
from proxy_service.errors import BadId
from proxy_service.ids import parse_id
from proxy_service.resolvers import TemplateResolver, check_key
from tests.conftest import ConfigFactory
from tests.support.cos_server import BUCKET, REGION, CosTestServer, pattern
from tests.support.http import Reply, raw_request, request
from tests.support.proxy import ThreadedProxy, running

BODY = pattern(0, 3000)
KEY = "key-for-security-tests-01"


@pytest.fixture
def proxy(cos: CosTestServer, cos_config: ConfigFactory) -> Iterator[ThreadedProxy]:
    cos.put("images/cat.png", BODY)
    with running(cos_config(allow_mode_override=True)) as p:
        yield p


def raw(proxy: ThreadedProxy, head: bytes) -> tuple[int, bytes, bytes]:
    """Send a request head exactly as given; the reply's status, header block and body."""
    reply = raw_request("127.0.0.1", proxy.port, head)
    status_line, _, rest = reply.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), headers.lower(), body


def get(proxy: ThreadedProxy, path: str = "/images/cat.png", **headers: str) -> Reply:
    return request(proxy.base_url + path, headers=headers)


def assert_origin_clean(cos: CosTestServer, prefix: str = "images/") -> None:
    """Every request that reached storage was for a key under the prefix, on the origin's host."""
    for r in cos.requests:
        assert check_key(r.key, prefix) == r.key
        assert r.headers.get("host") == cos.domain


# --- ids and paths ----------------------------------------------------------------------------


HOSTILE_IDS = [
    b"/images/../images/cat.png",
    b"/images/..%2Fcat.png",
    b"/images/%2e%2e/cat.png",
    b"/images/a/./cat.png",
    b"/images/cat.png%00.jpg",
    b"/images/cat%2Epng",
    b"/images/a\\..\\cat.png",
    b"/images/%EF%BC%8E%EF%BC%8E/cat.png",  # fullwidth dots, encoded
    b"/images/ca%CC%81t.png",
    b"/images//evil.example/cat.png",
    b"/images/evil.example:80/cat.png",
    b"/images/" + b"a" * 257,
    b"/images/" + b"a" * 10_240,
    b"/images/" + b"a/" * 5_000 + b"a",
    b"/%69mages/cat.png",  # routed on the decoded path; must not be sliced as raw
    b"/images%2Fcat.png",
]
# The parser itself refuses these (uvicorn's own 400): NUL, control characters and raw high
# bytes, and request lines over 64 KiB (httptools' URL parser keeps 16-bit offsets).
UNPARSEABLE = [
    b"/images/a\x00b",
    b"/images/a\x01b",
    b"/images/a\x7fb",
    b"/images/caf\xc3\xa9.png",
    b"/images/\xef\xbc\x8e\xef\xbc\x8e/cat.png",
    b"/images/" + b"a" * 100_000,
    b"/images/" + b"a" * 2_000_000,
]


def test_hostile_ids_are_400_before_storage(proxy: ThreadedProxy, cos: CosTestServer) -> None:
    for target in HOSTILE_IDS:
        status, headers, body = raw(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400, target[:80]
        assert b"cache-control: no-store" in headers
        assert body == b"invalid image id\n"
    for target in UNPARSEABLE:
        status, _, _ = raw(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400, target[:80]
    assert cos.requests == []
    assert get(proxy).status == 200  # and the server is still fine


_CONDITIONAL = {"range", "if-range", "if-none-match", "if-modified-since"}
_ORIGIN_HEADERS = {"host", "user-agent", "accept", "accept-encoding", *_CONDITIONAL}


def test_huge_headers_are_refused(proxy: ThreadedProxy, cos: CosTestServer) -> None:
    # httptools buffers headers of any size; the handler refuses more than 16 KiB or 100 fields
    # with a 431, and nothing oversized goes upstream.
    big = "x" * 1_000_000
    for headers in ({"X-Junk": big}, {"Cookie": big[:100_000], "Authorization": big[:50_000]}):
        reply = get(proxy, **headers)
        assert reply.status == 431
        assert reply.header("cache-control") == "no-store"
        assert reply.body == b"request headers too large\n"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    status, _, body = raw(proxy, b"GET /images/cat.png HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert (status, body) == (431, b"request headers too large\n")
    assert cos.requests == []
    # Large but plausible values are answered, and only what is well-formed goes upstream.
    assert get(proxy, **{"If-None-Match": '"' + "e" * 10_240 + '"'}).body == BODY
    assert all(set(r.headers) <= _ORIGIN_HEADERS for r in cos.requests)


RANGES = [
    ("bytes=0-9", 206, True),
    ("bytes=-5", 206, True),
    ("bytes=2990-", 206, True),
    ("bytes=5000-", 416, True),
    ("bytes=5-1", 200, True),
    (" bytes=0-9 ", 206, True),
    ("bytes=" + ",".join(f"{2 * i}-{2 * i + 1}" for i in range(1000)), 200, False),
    ("bytes=0-1,2-3", 200, False),
    ("bytes=0-1, 5-", 200, False),
    ("bytes=abc", 200, False),
    ("bytes=--1", 200, False),
    ("bytes=-", 200, False),
    ("bytes=", 200, False),
    ("items=0-9", 200, False),
    ("bytes=0-" + "9" * 30, 200, False),
    ("bytes=\u0660-\u0669", 200, False),  # Arabic-Indic digits
    ("\x01", 400, False),  # control characters: the parser's own 400
]


def test_malformed_ranges_are_ignored_never_forwarded(
    proxy: ThreadedProxy, cos: CosTestServer
) -> None:
    head = b"GET /images/cat.png HTTP/1.1\r\nHost: x\r\nRange: "
    for value, status, forwarded in RANGES:
        got, _, body = raw(proxy, head + value.encode() + b"\r\n\r\n")
        assert got == status, repr(value[:40])
        if status == 400:
            continue
        if status == 200:
            assert body == BODY
        sent = cos.requests[-1].headers.get("range")
        assert sent == (value.strip() if forwarded else None), value[:40]


def test_conditionals_are_forwarded_only_when_well_formed(
    proxy: ThreadedProxy, cos: CosTestServer
) -> None:
    etag = get(proxy).header("etag") or ""
    later = "Thu, 01 Jan 2099 00:00:00 GMT"
    cases: list[tuple[dict[str, str], int, dict[str, str]]] = [
        ({"If-None-Match": etag}, 304, {"if-none-match": etag}),
        ({"If-None-Match": f'W/"x", {etag}'}, 304, {"if-none-match": f'W/"x", {etag}'}),
        ({"If-None-Match": "*"}, 304, {"if-none-match": "*"}),
        ({"If-None-Match": "garbage"}, 200, {}),
        ({"If-None-Match": f"{etag}, garbage"}, 200, {}),
        ({"If-None-Match": '"' + "e" * 10_240 + '"'}, 200, {}),
        ({"If-Modified-Since": later}, 304, {"if-modified-since": later}),
        ({"If-Modified-Since": "yesterday"}, 200, {}),
        ({"If-Modified-Since": "Mon, 99 Foo 99999 99:99:99 GMT"}, 200, {}),
        ({"If-Modified-Since": "lundi 1 f\xe9vrier 2001"}, 200, {}),  # obs-text
        ({"Range": "bytes=0-9", "If-Range": etag}, 206, {"range": "bytes=0-9", "if-range": etag}),
        ({"Range": "bytes=0-9", "If-Range": "whenever"}, 206, {"range": "bytes=0-9"}),
        ({"If-Range": etag}, 200, {}),  # If-Range without Range means nothing
    ]
    for sent, status, forwarded in cases:
        cos.reset()
        assert get(proxy, **sent).status == status, sent
        conditional = {k: v for k, v in cos.requests[-1].headers.items() if k in _CONDITIONAL}
        assert conditional == forwarded, sent


def test_other_methods(proxy: ThreadedProxy, cos: CosTestServer) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"):
        reply = request(proxy.base_url + "/images/cat.png", method=method)
        assert reply.status == 405, method
        assert reply.header("allow") == "GET, HEAD"
        assert reply.header("cache-control") == "no-store"
    for head in (b"FOO /images/cat.png", b"CONNECT evil.example:443", b"get /images/cat.png"):
        status, _, _ = raw(proxy, head + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400, head
    assert cos.requests == []


def test_query_junk_is_ignored_recognised_junk_is_400(proxy: ThreadedProxy) -> None:
    for query in ("?", "?x", "?&&", "?=", "?utm_source=a&x=%00&y=%ZZ", "?MODE=zzz", "?mode=stream"):
        assert get(proxy, "/images/cat.png" + query).body == BODY, query
    for query in ("?mode=zzz", "?mode=Redirect", "?mode=%72edirect", "?x=1&mode=stream2"):
        reply = get(proxy, "/images/cat.png" + query)
        assert reply.status == 400, query
        assert reply.body == b"bad request\n"


# --- the origin is fixed by configuration -----------------------------------------------------


def test_no_request_can_change_the_upstream_host(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(allow_mode_override=True)) as proxy:
        heads = [
            b"GET /images/cat.png HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"GET http://evil.example/images/cat.png HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"GET http://user@evil.example:81/images/cat.png HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /images/cat.png HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: evil.example\r\n"
            b"Forwarded: host=evil.example\r\nX-Original-URL: //evil.example/x\r\n\r\n",
            b"HEAD /images/cat.png HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
        ]
        for head in heads:
            status, _, _ = raw(proxy, head)
            assert status == 200, head
        for target in (b"//evil.example/images/cat.png", b"/images/@evil.example/cat.png"):
            status, _, _ = raw(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status in (400, 404), target
        # `@` inside an id is just part of the key's path (logo@2x.png), never an authority.
        status, _, _ = raw(proxy, b"GET /images/cat.png@evil.example HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404
        redirect = b"GET http://evil.example/images/cat.png?mode=redirect HTTP/1.1\r\n"
        status, headers, _ = raw(proxy, redirect + b"Host: evil.example\r\n\r\n")
        assert status == 302
        location = re.search(rb"\r?\nlocation: ([^\r\n]+)", b"\r\n" + headers)
        assert location is not None
        assert location[1].startswith(cos.base_url.encode() + b"/images/cat.png?")
    assert len(cos.requests) == len(heads) + 1
    assert {r.key for r in cos.requests} == {"images/cat.png", "images/cat.png@evil.example"}
    assert_origin_clean(cos)


# --- limits -----------------------------------------------------------------------------------


def test_max_object_size_by_content_length(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/small.bin", b"s" * 1000)
    cos.put_pattern("images/big.bin", 1001)
    with running(cos_config(max_object_size=1000)) as proxy:
        assert get(proxy, "/images/small.bin").body == b"s" * 1000
        assert get(proxy, "/images/small.bin", Range="bytes=0-1").status == 206
        for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-9"})):
            reply = request(proxy.base_url + "/images/big.bin", method=method, headers=headers)
            assert reply.status == 502
            assert reply.header("cache-control") == "no-store"
            assert reply.body == (b"" if method == "HEAD" else b"object too large\n")
        assert get(proxy, "/images/big.bin", Range="bytes=5000-").status == 416  # no body anyway
        cos.wait_until(lambda: proxy.app.origin.in_flight == 0)


class ChunkedOrigin:
    """An origin answering every GET with a chunked body (no Content-Length), as some origins
    and CDNs do; `chunks` and `pause` set what it sends."""

    def __init__(self, chunks: list[bytes], pause: float = 0.0) -> None:
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in origin.chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        time.sleep(origin.pause)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True  # the proxy dropped us: expected

            def log_message(self, format: str, *args: object) -> None:
                return None

        self.chunks = chunks
        self.pause = pause
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.domain = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ChunkedOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def test_max_object_size_counts_chunked_bodies(cos_config: ConfigFactory) -> None:
    with ChunkedOrigin([b"a" * 1000] * 3) as origin:
        with running(cos_config(cos_domain=origin.domain, max_object_size=5000)) as proxy:
            reply = get(proxy, "/images/x.bin")
            assert reply.status == 200
            assert reply.body == b"a" * 3000
            assert reply.header("content-length") is None
        with running(cos_config(cos_domain=origin.domain, max_object_size=2000)) as proxy:
            origin.chunks = [b"b" * 4000]  # over the limit in the first read: still a status
            reply = get(proxy, "/images/x.bin")
            assert reply.status == 502
            assert reply.body == b"object too large\n"
            origin.chunks, origin.pause = [b"c" * 500] * 20, 0.02  # over it mid-stream: cut
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/images/x.bin")
            resp = conn.getresponse()
            assert resp.status == 200
            with pytest.raises(http.client.IncompleteRead):
                resp.read()
            conn.close()
            CosTestServer.wait_until(lambda: proxy.app.origin.in_flight == 0)
            assert proxy.app.handler.in_flight == 0


def _in_thread(fn: Callable[[], Reply]) -> tuple[threading.Thread, list[Reply]]:
    out: list[Reply] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_max_in_flight_answers_503_at_once(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(max_in_flight=1)) as proxy:
        cos.stall_next(0.5)
        thread, first = _in_thread(lambda: get(proxy))
        cos.wait_until(lambda: proxy.app.handler.in_flight == 1)
        started = time.monotonic()
        reply = get(proxy)
        assert time.monotonic() - started < 0.25
        assert reply.status == 503
        assert reply.header("retry-after") == "1"
        assert reply.header("cache-control") == "no-store"
        assert reply.body == b"overloaded\n"
        thread.join(10)
        assert first[0].body == BODY
        assert len(cos.requests) == 1  # the refused request never reached the origin
        assert get(proxy).status == 200
        assert proxy.app.handler.in_flight == 0


def test_waiting_for_a_pooled_connection_is_bounded(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    config = cos_config(
        upstream_pool_size=1, upstream_connect_timeout=0.3, upstream_retries=2, max_in_flight=0
    )
    with running(config) as proxy:
        cos.stall_next(1.0)  # holds the only pooled connection
        thread, first = _in_thread(lambda: get(proxy))
        cos.wait_until(lambda: len(cos.requests) == 1)
        started = time.monotonic()
        reply = get(proxy)
        elapsed = time.monotonic() - started
        assert reply.status == 503
        assert reply.header("retry-after") == "1"
        assert reply.body == b"overloaded\n"
        assert 0.25 < elapsed < 0.9  # one wait for the pool, not retried
        thread.join(10)
        assert first[0].body == BODY
        assert len(cos.requests) == 1


def test_internal_errors_are_a_bare_500(
    proxy: ThreadedProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("http://cos/images/cat.png?q-signature=deadbeef")

    monkeypatch.setattr(proxy.app.cache, "get", boom)
    with caplog.at_level(logging.ERROR, logger="proxy_service.handler"):
        reply = get(proxy)
    assert reply.status == 500
    assert reply.body == b"internal error\n"
    assert reply.header("cache-control") == "no-store"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged
    assert "boom" in logged  # where it happened
    assert "q-signature" not in logged
    assert all(r.exc_info is None for r in caplog.records)


# --- secrets ----------------------------------------------------------------------------------

SECRET_ID = "AKIDleakcheck0000000001"
SECRET_KEY = "cos-secret-key-leak-check-7f3a"
TOKEN = "sts-token-leak-check-91c2"
SIGNING = ("signing-key-new-leak-check-1", "signing-key-old-leak-check-2")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record) + repr(vars(record)))


def test_no_secret_reaches_logs_or_responses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    with CosTestServer(tmp_path / "bucket", secret_id=SECRET_ID, secret_key=SECRET_KEY) as cos:
        cos.require_token = TOKEN
        cos.put("images/cat.png", BODY)
        cos.put_pattern("images/big.bin", 200_000)
        config = Config(
            storage="cos",
            cos_secret_id=SECRET_ID,
            cos_secret_key=SECRET_KEY,
            cos_token=TOKEN,
            cos_bucket=BUCKET,
            cos_region=REGION,
            cos_domain=cos.domain,
            cos_scheme="http",
            upstream_read_timeout=0.3,
            upstream_retries=1,
            allow_mode_override=True,
            signing_keys=",".join(SIGNING),
            max_object_size=100_000,
            log_level="debug",
            object_cache_size=0,  # every request must reach the origin's failure modes
        )
        replies: list[Reply] = []
        caplog.set_level(logging.DEBUG)
        for logger in loggers:
            logger.addHandler(capture)
        try:
            with running(config) as proxy:

                def fetch(image_id: str, method: str = "GET", **kw: object) -> Reply:
                    path = signing.sign_path(image_id, SIGNING[1], **kw)  # type: ignore[arg-type]
                    reply = request(proxy.base_url + path, method=method)
                    replies.append(reply)
                    return reply

                assert fetch("cat.png").status == 200
                assert fetch("cat.png", "HEAD").status == 200
                cos.fail_next(403, code="SignatureDoesNotMatch")
                assert fetch("cat.png").status == 200  # re-signed and retried
                assert fetch("missing.png").status == 404
                cos.fail_next(403, count=2, code="AccessDenied")
                assert fetch("cat.png").status == 502
                cos.fail_next(500, count=2)
                assert fetch("cat.png").status == 502
                cos.stall_next(1.0, count=2)
                assert fetch("cat.png").status == 504
                redirect = fetch("cat.png", mode="redirect")
                assert redirect.status == 302
                assert "q-signature=" in (redirect.header("location") or "")  # by design
                assert fetch("big.bin").status == 502  # too large
                assert fetch("cat.png", expires=int(time.time()) - 5).status == 410
                for path in ("/images/cat.png", "/images/cat.png?s=" + "A" * 43, "/images/.."):
                    replies.append(request(proxy.base_url + path))
                assert [r.status for r in replies[-3:]] == [403, 403, 400]
        finally:
            for logger in loggers:
                logger.removeHandler(capture)
        presigned = [r.query["q-signature"] for r in cos.requests if "q-signature" in r.query]
    assert len(presigned) >= 10
    texts = capture.texts + [logging.Formatter().format(r) + repr(vars(r)) for r in caplog.records]
    assert any("proxy ready" in t for t in texts)  # the config dump was looked at too
    assert any("upstream_timeout" in t for t in texts)
    for reply in replies:
        shown = {k: v for k, v in reply.headers.items() if k != "location"}
        texts.append(repr(shown) + reply.body.decode("latin-1"))
    forbidden = [SECRET_ID, SECRET_KEY, TOKEN, *SIGNING, "q-signature", "q-ak=", *presigned]
    for text in texts:
        for secret in forbidden:
            assert secret not in text, (secret, text[:300])


def test_error_labels_and_messages_are_fixed() -> None:
    """Labels become metric labels and messages response bodies: fixed identifiers, no data."""

    def subclasses(cls: type[errors.ProxyError]) -> Iterator[type[errors.ProxyError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    classes: list[type[errors.ProxyError]] = [errors.ProxyError, *subclasses(errors.ProxyError)]
    labels = {cls.label for cls in classes}
    assert {"bad_signature", "expired_signature", "too_large", "overloaded"} <= labels
    for cls in classes:
        assert re.fullmatch(r"[a-z_]+", cls.label), cls
        assert re.fullmatch(r"[a-z ]+", cls.message), cls
        assert str(cls("detail").message) == cls.message
        assert cls.cache_control in ("no-store", "")


# --- properties -------------------------------------------------------------------------------

_raw_ids = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.sampled_from([b"a", b"b.png", b"..", b".", b"", b"%2F", b"~", b"-x", b"\\", b"\x00"]),
        min_size=1,
        max_size=6,
    ).map(b"/".join),
)


@settings(max_examples=300, derandomize=True, database=None)
@given(
    _raw_ids,
    st.sampled_from(["images/{id}", "{id}", "uploads/{id}.jpg", "a/b/{id}/original", "p-{id}"]),
)
def test_any_accepted_id_maps_to_a_key_under_the_prefix(raw_id: bytes, template: str) -> None:
    try:
        image_id = parse_id(raw_id, 256)
    except BadId:
        return
    key = _result(TemplateResolver(template).resolve(image_id))
    prefix = template.split("{id}")[0]
    assert check_key(key, prefix) == key
    assert key.startswith(prefix)
    assert ".." not in key.split("/")


def _result(coro: Coroutine[object, object, str]) -> str:
    """The value of a coroutine that never suspends (no event loop per example)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return str(stop.value)
    coro.close()
    raise AssertionError("the template resolver awaited something")


# --- HTTP fuzzing -----------------------------------------------------------------------------

_FRAGMENTS = [
    b"cat.png",
    b"missing.png",
    b"dir",
    b"a",
    b"..",
    b".",
    b"",
    b".env",
    b"%2F",
    b"%2f",
    b"%2e%2e",
    b"%00",
    b"%",
    b"%zz",
    b"@evil.example",
    b"evil.example:80",
    b"\\",
    b"~",
    b"-_",
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\xff",
    "／".encode(),  # noqa: RUF001 - fullwidth solidus on purpose
    "é".encode(),
    b"#frag",
    b";x=1",
    b"a" * 300,
    b"a" * 10_000,
]
_PREFIXES = [
    b"/images/",
    b"/images/",
    b"/images/",
    b"http://evil.example/images/",
    b"//evil.example/images/",
    b"/%69mages/",
    b"/images%2F",
    b"/images",
    b"/",
    b"*",
    b"/images/./",
    b"/images/../images/",
]
_NAMES = [b"s", b"exp", b"mode", b"x", b"", b"S", b"s%3D", b"mode[]"]
_VALUES = [
    b"",
    b"redirect",
    b"stream",
    b"zzz",
    b"123",
    b"99999999999",
    b"9999999999999",
    b"-1",
    b"%00",
    b"A" * 43,
    b"a" * 5000,
]
_HEADER_NAMES = [
    b"Range",
    b"If-None-Match",
    b"If-Modified-Since",
    b"If-Range",
    b"Host",
    b"X-Forwarded-Host",
    b"Forwarded",
    b"Cookie",
    b"Authorization",
    b"Accept-Encoding",
    b"X-Junk",
]
_HEADER_VALUES = [
    b"bytes=" + b",".join(b"%d-%d" % (2 * i, 2 * i + 1) for i in range(1000)),
    b'"' + b"e" * 10_240 + b'"',
    b"x" * 10_240,
    b"bytes=0-0",
    b"bytes=-1",
    b"bytes=5-1",
    b"bytes=0-",
    b"bytes=99999999-",
    b"*",
    b'"abc"',
    b'W/"abc", "def"',
    b"Thu, 01 Jan 1970 00:00:00 GMT",
    b"Mon, 99 Foo 99999 99:99:99 GMT",
    b"evil.example",
    b"\xff\xfe",
]
_METHODS = [b"GET", b"GET", b"GET", b"HEAD", b"POST", b"OPTIONS", b"DELETE", b"FOO", b"get"]


def _signed_targets() -> st.SearchStrategy[bytes]:
    """Valid signed paths, sometimes with a character changed."""
    now = int(time.time())
    base = st.builds(
        lambda image_id, exp, mode: signing.sign_path(image_id, KEY, expires=exp, mode=mode),
        st.sampled_from(["cat.png", "missing.png", "dir/a.png"]),
        st.one_of(st.none(), st.sampled_from([now - 10, now + 600])),
        st.one_of(st.none(), st.sampled_from(["stream", "redirect", "zzz"])),
    ).map(str.encode)

    def mutate(target: bytes, at: int, char: int) -> bytes:
        at %= len(target)
        return target[:at] + bytes([char]) + target[at + 1 :]

    mutated = st.builds(mutate, base, st.integers(0, 200), st.sampled_from(b"aZ9-_.&=?/%~"))
    return st.one_of(base, base, mutated)


_GOOD_IDS = [b"cat.png", b"dir/a.png", b"missing.png"]


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(_METHODS))
    kind = draw(st.sampled_from(["signed", "good", "hostile"]))
    if kind == "signed":
        target = draw(_signed_targets())
    else:
        if kind == "good":
            target = b"/images/" + draw(st.sampled_from(_GOOD_IDS))
        else:
            target = draw(st.sampled_from(_PREFIXES)) + b"/".join(
                draw(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=4))
            )
        pairs = draw(
            st.lists(
                st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)),
                max_size=4,
            )
        )
        if pairs:
            target += b"?" + b"&".join(name + b"=" + value for name, value in pairs)
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(_HEADER_NAMES),
                st.one_of(
                    st.sampled_from(_HEADER_VALUES),
                    st.binary(max_size=64).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                ),
            ),
            max_size=4,
        )
    )
    head = method + b" " + target + b" HTTP/1.1\r\n"
    if not any(name == b"Host" for name, _ in headers):
        head += b"Host: proxy.example\r\n"
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    return head + b"Connection: close\r\n\r\n"


def _head(target: bytes, *headers: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize("signed", [True, False], ids=["signing-on", "signing-off"])
def test_fuzz_raw_requests(cos: CosTestServer, cos_config: ConfigFactory, signed: bool) -> None:
    cos.put("images/cat.png", BODY)
    cos.put("images/dir/a.png", b"dir-a")
    config = cos_config(
        allow_mode_override=True,
        signing_keys=KEY if signed else "",
        upstream_retries=0,
    )
    seen = {"statuses": set[int]()}
    with running(config) as proxy:

        @settings(
            max_examples=300,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(_requests())
        @example(_head(b"/images/cat.png?mode=redirect"))
        @example(_head(b"/images/cat.png", b"Range: bytes=0-0"))
        @example(_head(signing.sign_path("cat.png", KEY, mode="redirect").encode()))
        @example(_head(signing.sign_path("dir/a.png", KEY).encode(), b"Range: bytes=-1"))
        @example(_head(signing.sign_path("cat.png", KEY, expires=1).encode()))
        def one(head: bytes) -> None:
            before = len(cos.requests)
            reply = raw_request("127.0.0.1", proxy.port, head)
            assert reply.startswith(b"HTTP/1.1 "), (head[:200], reply[:200])
            status = int(reply[9:12])
            seen["statuses"].add(status)
            assert status < 500, (head[:300], reply[:300])
            assert b"Traceback" not in reply
            assert b'File "' not in reply
            if status == 302:
                location = re.search(rb"\r\nlocation: ([^\r\n]+)", reply.lower())
                assert location is not None
                assert location[1].startswith(cos.base_url.encode() + b"/images/")
            for r in cos.requests[before:]:
                assert check_key(r.key, "images/") == r.key
                assert r.headers.get("host") == cos.domain
                assert r.key in ("images/cat.png", "images/dir/a.png") or r.status == 404

        one()
        cos.wait_until(lambda: proxy.app.handler.in_flight == 0)
    # The run exercised the interesting outcomes, not just one kind of refusal.
    expected = {200, 206, 302, 400, 404, 405} | ({403, 410} if signed else set())
    assert expected <= seen["statuses"], seen
    assert_origin_clean(cos)

"""The COS test origin, driven by the real SDK's signatures over real sockets."""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.etree import ElementTree

import pytest

from tests.support.cos_server import BUCKET, CosTestServer, make_client, pattern

KEY = "images/a.png"
DATA = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SIZE = 1000  # of the "pattern.bin" object


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def code(self) -> str | None:
        return ElementTree.fromstring(self.body).findtext("Code")

    @property
    def message(self) -> str | None:
        return ElementTree.fromstring(self.body).findtext("Message")


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        conn.request(method, f"{parts.path}?{parts.query}", headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def with_query(url: str, changes: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | changes
    return parts._replace(query=urlencode(query)).geturl()


@pytest.fixture
def cos(tmp_path: Path) -> Iterator[CosTestServer]:
    with CosTestServer(tmp_path / "bucket") as server:
        server.put(KEY, DATA)
        server.put_pattern("pattern.bin", SIZE)
        yield server


@pytest.fixture(autouse=True)
def _no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    assert not [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]


def test_presigned_get_returns_object_with_cos_headers(cos: CosTestServer) -> None:
    url = cos.presign(KEY)
    assert url.startswith(f"http://{cos.domain}/{KEY}?q-sign-algorithm=sha1&")

    reply = fetch(url)

    assert reply.status == 200
    assert reply.body == DATA
    assert reply.headers["ETag"] == f'"{hashlib.md5(DATA).hexdigest()}"'
    assert reply.headers["Content-Type"] == "image/png"
    assert reply.headers["Content-Length"] == str(len(DATA))
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Server"] == "tencent-cos"
    assert reply.headers["Last-Modified"].endswith(" GMT")
    assert reply.headers["x-cos-request-id"]
    assert (cos.requests[-1].method, cos.requests[-1].key) == ("GET", KEY)
    assert cos.requests[-1].status == 200
    cos.wait_until(lambda: cos.completed_streams == 1)


def test_unencoded_key_is_signed_and_unsigned_params_are_ignored(cos: CosTestServer) -> None:
    key = "photos/ä b+c%.jpg"
    cos.put(key, b"jpeg")
    url = cos.presign(key, params={"response-cache-control": "no-cache"})

    assert fetch(url).body == b"jpeg"
    assert fetch(url + "&unsigned=1").status == 200
    assert cos.requests[-1].key == key


def test_method_is_signed(cos: CosTestServer) -> None:
    head = fetch(cos.presign(KEY, method="HEAD"), method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["Content-Length"] == str(len(DATA))

    assert fetch(cos.presign(KEY), method="HEAD").status == 403
    assert cos.requests[-1].error_code == "SignatureDoesNotMatch"
    assert fetch(cos.presign(KEY, method="HEAD")).code == "SignatureDoesNotMatch"


def test_authorization_header_is_accepted(cos: CosTestServer) -> None:
    auth = make_client(cos).get_auth(Method="GET", Bucket=BUCKET, Key=KEY, Expired=60)
    reply = fetch(f"{cos.base_url}/{KEY}", headers={"Authorization": auth})
    assert (reply.status, reply.body) == (200, DATA)


Case = Callable[[CosTestServer], tuple[str, dict[str, str]]]
REJECTED: dict[str, tuple[Case, str]] = {
    "no signature": (lambda s: (f"{s.base_url}/{KEY}", {}), "AccessDenied"),
    "unknown secret id": (
        lambda s: (s.presign(KEY, secret_id="AKIDunknown"), {}),
        "InvalidAccessKeyId",
    ),
    "wrong secret key": (
        lambda s: (s.presign(KEY, secret_key="not-the-key"), {}),
        "SignatureDoesNotMatch",
    ),
    "tampered signature": (
        lambda s: (with_query(s.presign(KEY), {"q-signature": "0" * 40}), {}),
        "SignatureDoesNotMatch",
    ),
    "tampered key": (
        lambda s: (s.presign(KEY).replace("/a.png?", "/b.png?"), {}),
        "SignatureDoesNotMatch",
    ),
    "tampered sign time": (
        lambda s: (with_query(s.presign(KEY), {"q-sign-time": "0;9999999999"}), {}),
        "SignatureDoesNotMatch",
    ),
    "tampered signed param": (
        lambda s: (
            with_query(
                s.presign(KEY, params={"response-content-type": "image/png"}),
                {"response-content-type": "text/html"},
            ),
            {},
        ),
        "SignatureDoesNotMatch",
    ),
    "other host": (
        lambda s: (s.presign(KEY), {"Host": f"localhost:{s.port}"}),
        "SignatureDoesNotMatch",
    ),
}


@pytest.mark.parametrize(("make", "code"), REJECTED.values(), ids=REJECTED.keys())
def test_rejected_signatures(cos: CosTestServer, make: Case, code: str) -> None:
    cos.put("images/b.png", DATA)
    url, headers = make(cos)

    reply = fetch(url, headers=headers)

    assert (reply.status, reply.code) == (403, code)
    assert reply.headers["Content-Type"] == "application/xml"
    assert reply.body.startswith(b"<?xml version='1.0' encoding='utf-8' ?>\n<Error><Code>")
    root = ElementTree.fromstring(reply.body)
    assert root.findtext("RequestId") == reply.headers["x-cos-request-id"]
    seen = cos.requests[-1]
    assert root.findtext("Resource") == seen.headers["host"] + seen.path
    assert (seen.status, seen.error_code) == (403, code)
    assert root.findtext("TraceId")


def test_expiry_follows_the_injected_clock(cos: CosTestServer) -> None:
    url = cos.presign(KEY, expires=60)
    assert fetch(url).status == 200

    cos.clock = lambda: time.time() + 120
    reply = fetch(url)

    assert (reply.status, reply.code, reply.message) == (403, "AccessDenied", "Request has expired")


def test_signature_from_the_future_is_skewed(cos: CosTestServer) -> None:
    cos.clock = lambda: time.time() - 3600
    assert fetch(cos.presign(KEY)).code == "RequestTimeTooSkewed"


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=990-", 990, SIZE),
        ("bytes=-7", SIZE - 7, SIZE),
        ("bytes=500-99999", 500, SIZE),
    ],
)
def test_single_range(cos: CosTestServer, header: str, start: int, stop: int) -> None:
    reply = fetch(cos.presign("pattern.bin"), headers={"Range": header})

    assert reply.status == 206
    assert reply.body == pattern(start, stop)
    assert reply.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert reply.headers["Content-Length"] == str(stop - start)


def test_range_past_the_end_is_416(cos: CosTestServer) -> None:
    reply = fetch(cos.presign("pattern.bin"), headers={"Range": f"bytes={SIZE}-"})

    assert (reply.status, reply.code) == (416, "InvalidRange")
    assert reply.headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=x-3", "items=0-1", "bytes=9-3"])
def test_unusable_range_is_ignored(cos: CosTestServer, header: str) -> None:
    reply = fetch(cos.presign("pattern.bin"), headers={"Range": header})
    assert (reply.status, reply.body) == (200, pattern(0, SIZE))


def test_conditional_requests(cos: CosTestServer) -> None:
    first = fetch(cos.presign(KEY))
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]

    def status(**headers: str) -> int:
        reply = fetch(
            cos.presign(KEY), headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        if reply.status == 304:
            assert reply.body == b""
            assert (reply.headers["ETag"], reply.headers["Last-Modified"]) == (etag, last_modified)
        return reply.status

    assert status(If_None_Match=etag) == 304
    assert status(If_None_Match=f'"other", W/{etag}') == 304
    assert status(If_None_Match="*") == 304
    assert status(If_None_Match='"other"') == 200
    assert status(If_Modified_Since=last_modified) == 304
    assert status(If_Modified_Since="Thu, 01 Jan 1970 00:00:00 GMT") == 200
    assert status(If_None_Match='"other"', If_Modified_Since=last_modified) == 200
    assert status(Range="bytes=0-1", If_Range=etag) == 206
    assert status(Range="bytes=0-1", If_Range=last_modified) == 206
    assert status(Range="bytes=0-1", If_Range='"stale"') == 200
    assert status(Range="bytes=0-1", If_Range="Thu, 01 Jan 1970 00:00:00 GMT") == 200


def test_missing_key_and_other_methods(cos: CosTestServer) -> None:
    missing = fetch(cos.presign("images/missing.png"))
    assert (missing.status, missing.code) == (404, "NoSuchKey")

    put = fetch(cos.presign(KEY, method="PUT"), method="PUT")
    assert (put.status, put.code) == (405, "MethodNotAllowed")


def test_fail_next(cos: CosTestServer) -> None:
    url = cos.presign(KEY)
    cos.fail_next(503, count=2)
    cos.fail_next(500)

    replies = [fetch(url) for _ in range(4)]

    assert [(r.status, r.code) for r in replies[:3]] == [
        (503, "SlowDown"),
        (503, "SlowDown"),
        (500, "InternalError"),
    ]
    assert (replies[3].status, replies[3].body) == (200, DATA)


def test_stall_next(cos: CosTestServer) -> None:
    cos.stall_next(0.3)
    started = time.monotonic()
    assert fetch(cos.presign(KEY)).status == 200
    assert time.monotonic() - started >= 0.3


def test_abort_next_after(cos: CosTestServer) -> None:
    cos.abort_next_after(100)
    parts = urlsplit(cos.presign("pattern.bin"))
    conn = http.client.HTTPConnection(cos.domain.split(":")[0], cos.port, timeout=5)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        assert response.headers["Content-Length"] == str(SIZE)
        with pytest.raises(http.client.IncompleteRead) as excinfo:
            response.read()
    finally:
        conn.close()

    assert excinfo.value.partial == pattern(0, 100)
    cos.wait_until(lambda: cos.aborted_streams == 1 and cos.open_streams == 0)
    assert fetch(cos.presign("pattern.bin")).body == pattern(0, SIZE)


def test_drop_next(cos: CosTestServer) -> None:
    cos.drop_next()
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(cos.presign(KEY))
    assert cos.requests[-1].status == 0
    assert fetch(cos.presign(KEY)).status == 200


def test_sts_token_must_be_signed_and_match(cos: CosTestServer) -> None:
    cos.require_token = "sts-token"

    def code(url: str) -> str | None:
        reply = fetch(url)
        return "OK" if reply.status == 200 else reply.code

    signed = cos.presign(KEY, params={"x-cos-security-token": "sts-token"})
    assert code(signed) == "OK"
    assert code(cos.presign(KEY)) == "InvalidAccessKeyId"
    assert code(cos.presign(KEY) + "&x-cos-security-token=sts-token") == "InvalidAccessKeyId"
    assert code(cos.presign(KEY, params={"x-cos-security-token": "old"})) == "InvalidAccessKeyId"
    tampered = with_query(signed, {"x-cos-security-token": "forged"})
    assert code(tampered) == "SignatureDoesNotMatch"


def test_client_going_away_mid_body_is_counted(cos: CosTestServer) -> None:
    size = 20 * 1024 * 1024
    cos.put_pattern("big.bin", size)
    parts = urlsplit(cos.presign("big.bin"))
    conn = http.client.HTTPConnection(cos.domain.split(":")[0], cos.port, timeout=5)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        assert response.read(65536) == pattern(0, 65536)
        # Backpressure: the server is stuck writing, not done buffering 20 MiB.
        time.sleep(0.1)
        assert (cos.open_streams, cos.completed_streams) == (1, 0)
    finally:
        conn.close()

    cos.wait_until(lambda: cos.open_streams == 0)
    assert (cos.aborted_streams, cos.completed_streams) == (1, 0)


def test_extra_headers_on_success_only(cos: CosTestServer) -> None:
    cos.extra_headers = {"Set-Cookie": "a=b", "Content-Disposition": "attachment"}

    ok = fetch(cos.presign(KEY))
    denied = fetch(f"{cos.base_url}/{KEY}")

    assert ok.headers["Set-Cookie"] == "a=b"
    assert ok.headers["Content-Disposition"] == "attachment"
    assert "Set-Cookie" not in denied.headers


def test_stop_with_requests_in_flight(tmp_path: Path) -> None:
    server = CosTestServer(tmp_path).start()
    server.put(KEY, DATA)
    server.stall_next(30)
    path = urlsplit(server.presign(KEY)).path
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled:
        stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.domain}\r\n\r\n".encode())
        server.wait_until(lambda: len(server.requests) == 1)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
            started = time.monotonic()
            server.stop()

            assert time.monotonic() - started < 5
            assert stalled.recv(1) == b""
            assert idle.recv(1) == b""
    assert not [t for t in threading.enumerate() if t.name.startswith("cos-test-")]
    server.stop()  # idempotent

"""The pooled upstream client against the COS test origin: relaying, retries, error mapping."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy_service.config import Config
from proxy_service.errors import (
    StreamAborted,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamTimeout,
)
from proxy_service.storage.cos import CosSigner
from proxy_service.upstream import HttpOrigin
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer, pattern


def fetch(
    config: Config, key: str, method: str = "GET", **headers: str
) -> tuple[int, dict[bytes, bytes], bytes]:
    async def go() -> tuple[int, dict[bytes, bytes], bytes]:
        origin = HttpOrigin(config)
        await origin.start()
        try:
            entry = CosSigner(config).sign(key, time.time())
            resp = await origin.open(entry, method, headers)
            try:
                body = b""
                while chunk := await resp.read():
                    body += chunk
                return resp.status, dict(resp.headers), body
            finally:
                resp.close()
                assert origin.in_flight == 0
        finally:
            await origin.aclose()

    return asyncio.run(go())


def test_relays_only_allowed_headers(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"png-bytes")
    cos.extra_headers = {"Set-Cookie": "a=b", "Content-Disposition": "attachment", "X-Other": "1"}
    status, headers, body = fetch(cos_config(), "images/a.png")
    assert status == 200
    assert body == b"png-bytes"
    assert set(headers) == {
        b"content-type",
        b"content-length",
        b"accept-ranges",
        b"etag",
        b"last-modified",
    }


def test_passes_range_and_conditionals(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put_pattern("images/b.bin", 10_000)
    status, headers, body = fetch(cos_config(), "images/b.bin", range="bytes=10-19")
    assert (status, body) == (206, pattern(10, 20))
    assert headers[b"content-range"] == b"bytes 10-19/10000"
    etag = headers[b"etag"].decode()
    assert fetch(cos_config(), "images/b.bin", **{"if-none-match": etag})[0] == 304
    assert fetch(cos_config(), "images/b.bin", range="bytes=20000-")[0] == 416


def test_error_mapping(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    config = cos_config(upstream_retries=0)
    with pytest.raises(UpstreamNotFound):
        fetch(config, "images/missing.png")
    cos.put("images/a.png", b"x")
    with pytest.raises(UpstreamForbidden, match="SignatureDoesNotMatch"):
        fetch(cos_config(cos_secret_key="bad"), "images/a.png")
    cos.fail_next(500)
    with pytest.raises(UpstreamError, match="status 500"):
        fetch(config, "images/a.png")
    cos.fail_next(400)
    with pytest.raises(UpstreamError, match="unexpected upstream status 400"):
        fetch(cos_config(upstream_retries=2), "images/a.png")
    assert [r.status for r in cos.requests][-1:] == [400]  # a 4xx is not retried


def test_retries_are_bounded(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"x")
    cos.fail_next(503, count=2)
    assert fetch(cos_config(upstream_retries=2), "images/a.png")[2] == b"x"
    cos.reset()
    cos.fail_next(503, count=5)
    with pytest.raises(UpstreamError):
        fetch(cos_config(upstream_retries=2), "images/a.png")
    assert len(cos.requests) == 3


def test_timeout_before_headers(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"x")
    cos.stall_next(1.0)
    with pytest.raises(UpstreamTimeout):
        fetch(cos_config(upstream_retries=0, upstream_read_timeout=0.2), "images/a.png")


def test_body_cut_short_raises_stream_aborted(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put_pattern("images/c.bin", 2_000_000)
    cos.abort_next_after(500_000)
    with pytest.raises(StreamAborted):
        fetch(cos_config(), "images/c.bin")


def test_presigned_query_is_not_requoted(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    # The SDK percent-encodes ';' in q-sign-time and spaces in keys; re-quoting would break them.
    cos.put("images/with space+plus.png", b"ok")
    assert fetch(cos_config(), "images/with space+plus.png")[2] == b"ok"

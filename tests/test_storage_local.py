"""The local-directory origin: the same HTTP semantics as COS, served from files under a root."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from proxy_service.config import Config
from proxy_service.errors import UpstreamNotFound
from proxy_service.headers import http_date, parse_http_date
from proxy_service.storage.base import OriginResponse
from proxy_service.storage.local import LocalOrigin, LocalSigner

T = TypeVar("T")

BODY = bytes(range(256)) * 400  # 102,400 bytes
SIZE = len(BODY)
KEY = "images/big.png"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "big.png").write_bytes(BODY)
    (root / "images" / "small.jpg").write_bytes(b"0123456789")
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "blob.unknownext").write_bytes(b"xyz")
    return root


@pytest.fixture
def config(root: Path) -> Config:
    return Config.load({}, {"local_root": str(root), "upstream_read_size": 4096})


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


async def fetch(
    config: Config, key: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[OriginResponse, bytes, list[bytes]]:
    """Open, read to the end chunk by chunk, close, and check that nothing stays in flight."""
    origin = LocalOrigin(config)
    entry = LocalSigner(config).sign(key, time.time())
    response = await origin.open(entry, method, headers or {})
    chunks: list[bytes] = []
    try:
        while chunk := await response.read():
            chunks.append(chunk)
        assert response.at_eof()
        assert await response.read() == b""
    finally:
        response.close()
    assert origin.in_flight == 0
    return response, b"".join(chunks), chunks


def get(
    config: Config, key: str = KEY, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[OriginResponse, bytes, list[bytes]]:
    return run(lambda: fetch(config, key, method, headers))


def header_map(response: OriginResponse) -> dict[bytes, bytes]:
    names = [name for name, _ in response.headers]
    assert len(names) == len(set(names)), "duplicate header"
    assert all(name == name.lower() for name in names)
    return dict(response.headers)


# --- 200 --------------------------------------------------------------------------------------


def test_full_body_in_chunks(config: Config, root: Path) -> None:
    response, body, chunks = get(config)
    assert response.status == 200
    assert body == BODY
    assert len(chunks) == -(-SIZE // 4096)  # 25 chunks of at most 4 KiB
    assert all(len(chunk) <= 4096 for chunk in chunks)


def test_full_response_headers(config: Config, root: Path) -> None:
    response, _, _ = get(config)
    headers = header_map(response)
    mtime = (root / KEY).stat().st_mtime
    assert headers[b"content-type"] == b"image/png"
    assert headers[b"content-length"] == str(SIZE).encode()
    assert headers[b"accept-ranges"] == b"bytes"
    assert headers[b"last-modified"] == http_date(mtime).encode()
    assert parse_http_date(headers[b"last-modified"].decode()) == int(mtime)
    etag = headers[b"etag"]
    assert etag.startswith(b'"')
    assert etag.endswith(b'"')
    assert b"content-range" not in headers


def test_content_type_by_extension(config: Config) -> None:
    assert header_map(get(config, "images/small.jpg")[0])[b"content-type"] == b"image/jpeg"
    unknown = header_map(get(config, "images/blob.unknownext")[0])
    assert unknown[b"content-type"] == b"application/octet-stream"


def test_etag_changes_with_content(config: Config, root: Path) -> None:
    before = header_map(get(config, "images/small.jpg")[0])[b"etag"]
    path = root / "images" / "small.jpg"
    path.write_bytes(b"0123456789abc")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    response, body, _ = get(config, "images/small.jpg")
    assert body == b"0123456789abc"
    assert header_map(response)[b"etag"] != before


def test_empty_file(config: Config) -> None:
    response, body, chunks = get(config, "images/empty.png")
    assert response.status == 200
    assert body == b""
    assert chunks == []
    assert header_map(response)[b"content-length"] == b"0"


def test_bundled_sample_with_default_config() -> None:
    response, body, _ = get(Config.load({}), "images/sample.png")
    assert response.status == 200
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    assert header_map(response)[b"content-length"] == str(len(body)).encode()


# --- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=0-0", 0, 0),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=5000-", 5000, SIZE - 1),
        ("bytes=4095-8192", 4095, 8192),
        ("bytes=100000-999999", 100000, SIZE - 1),
    ],
)
def test_range_206(config: Config, value: str, start: int, end: int) -> None:
    response, body, chunks = get(config, headers={"range": value})
    assert response.status == 206
    headers = header_map(response)
    assert headers[b"content-range"] == f"bytes {start}-{end}/{SIZE}".encode()
    assert headers[b"content-length"] == str(end - start + 1).encode()
    assert body == BODY[start : end + 1]
    assert all(len(chunk) <= 4096 for chunk in chunks)


@pytest.mark.parametrize("value", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
def test_range_416(config: Config, value: str) -> None:
    response, body, _ = get(config, headers={"range": value})
    assert response.status == 416
    assert header_map(response)[b"content-range"] == f"bytes */{SIZE}".encode()
    assert body == b""


def test_range_on_empty_file_is_416(config: Config) -> None:
    response, body, _ = get(config, "images/empty.png", headers={"range": "bytes=0-"})
    assert response.status == 416
    assert header_map(response)[b"content-range"] == b"bytes */0"
    assert body == b""


@pytest.mark.parametrize("value", ["bytes=abc", "bytes=9-1", "items=0-1", "bytes=0-1,5-6"])
def test_unusable_range_gives_full_200(config: Config, value: str) -> None:
    response, body, _ = get(config, headers={"range": value})
    assert response.status == 200
    assert body == BODY
    assert b"content-range" not in header_map(response)


# --- conditionals -----------------------------------------------------------------------------


def _validators(config: Config) -> tuple[str, str]:
    headers = header_map(get(config)[0])
    return headers[b"etag"].decode(), headers[b"last-modified"].decode()


def test_if_none_match_304(config: Config) -> None:
    etag, _ = _validators(config)
    for value in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        response, body, _ = get(config, headers={"if-none-match": value})
        assert response.status == 304, value
        assert body == b""
        headers = header_map(response)
        assert headers[b"etag"] == etag.encode()
        assert b"content-length" not in headers


def test_if_none_match_mismatch_200(config: Config) -> None:
    response, body, _ = get(config, headers={"if-none-match": '"nope"'})
    assert response.status == 200
    assert body == BODY


def test_if_modified_since(config: Config, root: Path) -> None:
    _, last_modified = _validators(config)
    response, body, _ = get(config, headers={"if-modified-since": last_modified})
    assert response.status == 304
    assert body == b""
    mtime = (root / KEY).stat().st_mtime
    later = http_date(mtime + 3600)
    assert get(config, headers={"if-modified-since": later})[0].status == 304
    earlier = http_date(mtime - 3600)
    response, body, _ = get(config, headers={"if-modified-since": earlier})
    assert response.status == 200
    assert body == BODY
    response, body, _ = get(config, headers={"if-modified-since": "garbage"})
    assert response.status == 200


def test_not_modified_wins_over_range(config: Config) -> None:
    etag, _ = _validators(config)
    response, _, _ = get(config, headers={"if-none-match": etag, "range": "bytes=0-9"})
    assert response.status == 304


def test_if_range(config: Config) -> None:
    etag, last_modified = _validators(config)
    rng = {"range": "bytes=10-19"}
    response, body, _ = get(config, headers={**rng, "if-range": etag})
    assert (response.status, body) == (206, BODY[10:20])
    response, body, _ = get(config, headers={**rng, "if-range": last_modified})
    assert (response.status, body) == (206, BODY[10:20])
    for stale in ('"other"', f"W/{etag}", "Mon, 01 Jan 2001 00:00:00 GMT", "garbage"):
        response, body, _ = get(config, headers={**rng, "if-range": stale})
        assert response.status == 200, stale
        assert body == BODY
        assert b"content-range" not in header_map(response)


# --- HEAD -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"range": "bytes=10-19"}, {"range": f"bytes={SIZE}-"}, {"if-none-match": "*"}]
)
def test_head_has_get_headers_and_no_body(config: Config, headers: dict[str, str]) -> None:
    got, _, _ = get(config, headers=headers)
    head, body, chunks = get(config, method="HEAD", headers=headers)
    assert head.status == got.status
    assert head.headers == got.headers
    assert body == b""
    assert chunks == []


def test_head_does_not_count_as_in_flight(config: Config) -> None:
    async def check() -> None:
        origin = LocalOrigin(config)
        entry = LocalSigner(config).sign(KEY, time.time())
        response = await origin.open(entry, "HEAD", {})
        assert origin.in_flight == 0
        assert response.at_eof()
        response.close()
        assert origin.in_flight == 0

    run(check)


# --- not found --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["images/missing.png", "images", "images/sub", "images/big.png/x", "nothing/at/all.png"],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_missing_or_directory_is_not_found(config: Config, key: str, method: str) -> None:
    with pytest.raises(UpstreamNotFound):
        get(config, key, method)


def test_symlink_out_of_root_is_not_found(config: Config, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"top secret")
    (root / "images" / "escape.png").symlink_to(outside / "secret.png")
    (root / "images" / "escapedir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UpstreamNotFound):
        get(config, "images/escape.png")
    with pytest.raises(UpstreamNotFound):
        get(config, "images/escapedir/secret.png")
    with pytest.raises(UpstreamNotFound):
        get(config, "images/escape.png", "HEAD")


def test_symlink_within_root_is_served(config: Config, root: Path) -> None:
    (root / "images" / "alias.jpg").symlink_to(root / "images" / "small.jpg")
    response, body, _ = get(config, "images/alias.jpg")
    assert response.status == 200
    assert body == b"0123456789"


def test_dangling_symlink_is_not_found(config: Config, root: Path) -> None:
    (root / "images" / "dangling.png").symlink_to(root / "images" / "gone.png")
    with pytest.raises(UpstreamNotFound):
        get(config, "images/dangling.png")


# --- in_flight --------------------------------------------------------------------------------


def test_in_flight_counts_open_bodies(config: Config) -> None:
    async def check() -> None:
        origin = LocalOrigin(config)
        signer = LocalSigner(config)
        assert origin.in_flight == 0
        first = await origin.open(signer.sign(KEY, time.time()), "GET", {})
        second = await origin.open(signer.sign("images/small.jpg", time.time()), "GET", {})
        assert origin.in_flight == 2

        # Reading to the end does not release: only close() does.
        while await second.read():
            pass
        assert second.at_eof()
        assert origin.in_flight == 2
        second.close()
        assert origin.in_flight == 1
        second.close()  # idempotent
        assert origin.in_flight == 1

        # Closing with an unread body releases too.
        assert len(await first.read()) == 4096
        assert not first.at_eof()
        first.close()
        assert origin.in_flight == 0
        assert await first.read() == b""

        # Responses without a body are never counted.
        for headers in ({"if-none-match": "*"}, {"range": f"bytes={SIZE}-"}):
            response = await origin.open(signer.sign(KEY, time.time()), "GET", headers)
            assert origin.in_flight == 0
            response.close()
        with pytest.raises(UpstreamNotFound):
            await origin.open(signer.sign("images/none.png", time.time()), "GET", {})
        assert origin.in_flight == 0

    run(check)


def test_signer_entry(config: Config) -> None:
    entry = LocalSigner(config).sign("images/a.png", 1000.0)
    assert entry.key == "images/a.png"
    assert entry.signed_at == 1000.0
    assert entry.expires_at == 1000.0 + config.sign_expires
    assert entry.url_for("GET") == entry.url_for("HEAD") == ""

"""Range and conditional-request semantics, and which request headers go upstream."""

from __future__ import annotations

import pytest

from proxy_service.headers import (
    MAX_HEADER_VALUE,
    Range,
    etag_matches,
    forward_headers,
    http_date,
    if_range_allows,
    not_modified,
    parse_http_date,
    parse_range,
)

# --- parse_range ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=0-9", 100, Range(0, 9)),
        ("bytes=0-0", 100, Range(0, 0)),
        ("bytes=99-99", 100, Range(99, 99)),
        ("bytes=5-", 100, Range(5, 99)),
        ("bytes=0-", 100, Range(0, 99)),
        ("bytes=-3", 100, Range(97, 99)),
        ("bytes=-100", 100, Range(0, 99)),
        ("bytes=-500", 100, Range(0, 99)),
        ("bytes=90-1000", 100, Range(90, 99)),
        ("bytes=0-9", 5, Range(0, 4)),
        ("Bytes=1-2", 100, Range(1, 2)),
        (" bytes = 1-2 ", 100, Range(1, 2)),
        ("bytes=00-09", 100, Range(0, 9)),
    ],
)
def test_parse_range_single(value: str, size: int, expected: Range) -> None:
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=101-", 100),
        ("bytes=100-200", 100),
        ("bytes=1000-1001", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-1", 0),
        ("bytes=-0", 0),
    ],
)
def test_parse_range_unsatisfiable(value: str, size: int) -> None:
    assert parse_range(value, size) is False


@pytest.mark.parametrize(
    "value",
    [
        "bytes=abc",
        "bytes=9-1",
        "items=0-1",
        "bytes0-1",
        "bytes 0-1",
        "bytes",
        "",
        "bytes=",
        "bytes=-",
        "bytes=a-1",
        "bytes=1-b",
        "bytes=--1",
        "bytes=-+1",
        "bytes=+1-2",
        "bytes=1.5-2",
        "bytes=1-2-3",
        "bytes=-1-2",
        "bytes=- 1",
        "bytes=1 -2",
        "bytes=0x10-0x20",
        "bytes=\u00b2-3",  # superscript two: isdigit() but not int()
    ],
)
def test_parse_range_malformed_is_ignored(value: str) -> None:
    assert parse_range(value, 100) is None


@pytest.mark.parametrize("value", ["bytes=0-1,3-4", "bytes=0-1, 5-6", "bytes=0-1,", "bytes=,0-1"])
def test_parse_range_multi_is_ignored(value: str) -> None:
    assert parse_range(value, 100) is None


# --- etag_matches -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "etag", "expected"),
    [
        ('"abc"', '"abc"', True),
        ('W/"abc"', '"abc"', True),
        ('"abc"', 'W/"abc"', True),
        ('W/"abc"', 'W/"abc"', True),
        ('"x", "abc"', '"abc"', True),
        ('"x",W/"abc" , "y"', '"abc"', True),
        ("*", '"abc"', True),
        (" * ", '"abc"', True),
        ('"x", "y"', '"abc"', False),
        ('"ab"', '"abc"', False),
        ('"ABC"', '"abc"', False),
        ("abc", '"abc"', False),
        ("", '"abc"', False),
    ],
)
def test_etag_matches(header: str, etag: str, expected: bool) -> None:
    assert etag_matches(header, etag) is expected


# --- not_modified -----------------------------------------------------------------------------

ETAG = '"5f3a-64"'
MTIME = 1_700_000_000.75  # sub-second: HTTP dates only carry whole seconds
LAST_MODIFIED = http_date(MTIME)


def test_http_date_round_trips_to_whole_seconds() -> None:
    assert LAST_MODIFIED.endswith(" GMT")
    assert parse_http_date(LAST_MODIFIED) == int(MTIME)


@pytest.mark.parametrize("value", ["", "yesterday", "Tue, 99 Foo 2023 99:99:99 GMT", "0"])
def test_parse_http_date_garbage(value: str) -> None:
    assert parse_http_date(value) is None


def test_not_modified_without_conditionals() -> None:
    assert not_modified({}, ETAG, MTIME) is False
    assert not_modified({"range": "bytes=0-1"}, ETAG, MTIME) is False


def test_not_modified_if_none_match() -> None:
    assert not_modified({"if-none-match": ETAG}, ETAG, MTIME) is True
    assert not_modified({"if-none-match": f'W/{ETAG}, "other"'}, ETAG, MTIME) is True
    assert not_modified({"if-none-match": "*"}, ETAG, MTIME) is True
    assert not_modified({"if-none-match": '"other"'}, ETAG, MTIME) is False


def test_if_none_match_wins_over_if_modified_since() -> None:
    later = http_date(MTIME + 3600)
    earlier = http_date(MTIME - 3600)
    # A mismatching ETag means modified, whatever the date says.
    assert not_modified({"if-none-match": '"other"', "if-modified-since": later}, ETAG, MTIME) is (
        False
    )
    # A matching ETag means not modified, whatever the date says.
    assert not_modified({"if-none-match": ETAG, "if-modified-since": earlier}, ETAG, MTIME) is True


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        (LAST_MODIFIED, True),
        (http_date(MTIME + 1), True),
        (http_date(MTIME + 86400 * 365), True),
        (http_date(MTIME - 1), False),
        (http_date(0), False),
        ("yesterday", False),
        ("", False),
        ("Mon, 32 Jan 2024 00:00:00 GMT", False),
    ],
)
def test_not_modified_if_modified_since(since: str, expected: bool) -> None:
    assert not_modified({"if-modified-since": since}, ETAG, MTIME) is expected


# --- if_range_allows --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_range", "etag", "expected"),
    [
        (None, ETAG, True),
        (ETAG, ETAG, True),
        (f" {ETAG} ", ETAG, True),
        ('"other"', ETAG, False),
        (f"W/{ETAG}", ETAG, False),
        (f"W/{ETAG}", f"W/{ETAG}", False),
        (LAST_MODIFIED, ETAG, True),
        (http_date(MTIME + 1), ETAG, False),
        (http_date(MTIME - 1), ETAG, False),
        ("yesterday", ETAG, False),
        ("", ETAG, False),
    ],
)
def test_if_range_allows(if_range: str | None, etag: str, expected: bool) -> None:
    headers = {"range": "bytes=0-1"}
    if if_range is not None:
        headers["if-range"] = if_range
    assert if_range_allows(headers, etag, MTIME) is expected


# --- forward_headers --------------------------------------------------------------------------


def test_forward_headers_keeps_only_what_selects_bytes() -> None:
    raw = [
        (b"host", b"proxy.example.com"),
        (b"cookie", b"session=abc"),
        (b"authorization", b"Bearer token"),
        (b"range", b"bytes=0-99"),
        (b"if-range", b'"abc"'),
        (b"if-none-match", b'"abc"'),
        (b"if-modified-since", b"Tue, 14 Nov 2023 22:13:20 GMT"),
        (b"x-cos-security-token", b"tok"),
        (b"accept-encoding", b"gzip"),
        (b"user-agent", b"curl/8"),
        (b"x-forwarded-for", b"10.0.0.1"),
    ]
    assert forward_headers(raw) == {
        "range": "bytes=0-99",
        "if-range": '"abc"',
        "if-none-match": '"abc"',
        "if-modified-since": "Tue, 14 Nov 2023 22:13:20 GMT",
    }


def test_forward_headers_drops_overlong_values() -> None:
    at_limit = b"bytes=" + b"0" * (MAX_HEADER_VALUE - 8) + b"-1"
    assert len(at_limit) == MAX_HEADER_VALUE
    raw = [
        (b"range", at_limit),
        (b"if-none-match", b'"' + b"a" * MAX_HEADER_VALUE + b'"'),
        (b"if-modified-since", b"x" * (MAX_HEADER_VALUE + 1)),
    ]
    assert forward_headers(raw) == {"range": at_limit.decode()}


def test_forward_headers_empty() -> None:
    assert forward_headers([]) == {}


def test_forward_headers_decodes_latin1() -> None:
    assert forward_headers([(b"if-none-match", b'"\xe9"')]) == {"if-none-match": '"\u00e9"'}

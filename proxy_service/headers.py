"""Which headers cross the proxy in each direction, and the HTTP semantics we compute ourselves
(ranges and conditionals, for origins that are not an HTTP server: the local directory).

Header names are lower-case bytes, as in ASGI scopes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Literal

# Sent upstream: only what changes which bytes come back. Never Host, cookies or auth.
FORWARD_REQUEST = frozenset((b"range", b"if-range", b"if-none-match", b"if-modified-since"))

# Relayed to the client. Not x-cos-*, Server, Set-Cookie, Content-Disposition, Cache-Control:
# the object's own metadata must not turn an <img> into a download or override our policy.
RELAY_RESPONSE = frozenset(
    (
        b"content-type",
        b"content-length",
        b"content-range",
        b"accept-ranges",
        b"etag",
        b"last-modified",
        b"content-encoding",
    )
)

MAX_HEADER_VALUE = 1024

Headers = list[tuple[bytes, bytes]]


_RANGE = re.compile(r"bytes=(?:[0-9]{1,19}-[0-9]{0,19}|-[0-9]{1,19})")  # one range; no multipart
_ETAG = r'(?:W/)?"[\x21\x23-\x7e]{0,256}"'
_ONE_ETAG = re.compile(_ETAG)
_ETAGS = re.compile(rf"\*|{_ETAG}(?:[ \t]*,[ \t]*{_ETAG}){{0,31}}")
_DATE = re.compile(r"[\x20-\x7e]{1,64}")


def request_headers(raw: Headers, method: str) -> dict[str, str]:
    """What a request hands to any origin (COS, the local directory, the memory cache): the
    forwarded headers that are well-formed, and no Range on a HEAD (RFC 9110 §14.2: range
    handling is defined for GET only; a HEAD answers as a plain GET would)."""
    headers = safe_request_headers(forward_headers(raw))
    if method == "HEAD":
        headers.pop("range", None)
        headers.pop("if-range", None)
    return headers


def forward_headers(raw: Headers) -> dict[str, str]:
    """The request headers that select bytes (absurdly long values are dropped, not sent)."""
    out: dict[str, str] = {}
    for name, value in raw:
        if name in FORWARD_REQUEST and len(value) <= MAX_HEADER_VALUE:
            out[name.decode("latin-1")] = value.decode("latin-1")
    return out


def safe_request_headers(headers: dict[str, str]) -> dict[str, str]:
    """The client's Range and conditional headers that are well-formed; the rest are dropped
    (the request is then answered as if they were absent, which HTTP allows for all of them)."""
    if not headers:
        return headers
    out: dict[str, str] = {}
    rng = headers.get("range", "").strip()
    if _RANGE.fullmatch(rng):
        out["range"] = rng
        if_range = headers.get("if-range", "").strip()
        if _ONE_ETAG.fullmatch(if_range) or _is_date(if_range):
            out["if-range"] = if_range
    inm = headers.get("if-none-match", "").strip()
    if _ETAGS.fullmatch(inm):
        out["if-none-match"] = inm
    ims = headers.get("if-modified-since", "").strip()
    if _is_date(ims):
        out["if-modified-since"] = ims
    return out


def _is_date(value: str) -> bool:
    return _DATE.fullmatch(value) is not None and parse_http_date(value) is not None


def http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class Range:
    start: int
    end: int  # inclusive


def parse_range(value: str, size: int) -> Range | Literal[False] | None:
    """A single `bytes=` range against an object of `size` bytes.

    Returns the range; None when the header should be ignored (malformed, or several ranges,
    answered with the whole object as RFC 9110 allows); False when it cannot be satisfied (416).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix < 0 or not last.isdigit():
                return None
            if suffix == 0 or size == 0:
                return False
            return Range(max(0, size - suffix), size - 1)
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        # Open-ended: never below `start`, so a start past the end is 416, not "malformed".
        end = int(last) if last else max(start, size - 1)
    except ValueError:
        return None
    if end < start:
        return None
    if start >= size:
        return False
    return Range(start, min(end, size - 1))


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match: weak comparison over a list of tags, or `*`."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def not_modified(headers: dict[str, str], etag: str, mtime: float) -> bool:
    inm = headers.get("if-none-match")
    if inm is not None:
        return etag_matches(inm, etag)
    ims = headers.get("if-modified-since")
    if ims is not None:
        since = parse_http_date(ims)
        return since is not None and int(mtime) <= since
    return False


def if_range_allows(headers: dict[str, str], etag: str, mtime: float) -> bool:
    """If-Range: the range applies only if the validator still matches (strong ETag or date)."""
    value = headers.get("if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and value == etag
    date = parse_http_date(value)
    return date is not None and date == int(mtime)


def select(
    headers: dict[str, str], etag: str, mtime: float, size: int
) -> tuple[int, int, int, Headers]:
    """What to answer from a stored copy, given the client's conditional and range headers:
    (status, first byte, length, extra headers) for 304, 416, 206 or 200."""
    if not_modified(headers, etag, mtime):
        return 304, 0, 0, []
    rng = headers.get("range")
    if rng is not None and if_range_allows(headers, etag, mtime):
        parsed = parse_range(rng, size)
        if parsed is False:
            return 416, 0, 0, [(b"content-range", b"bytes */%d" % size)]
        if parsed is not None:
            length = parsed.end - parsed.start + 1
            content_range = b"bytes %d-%d/%d" % (parsed.start, parsed.end, size)
            return 206, parsed.start, length, [(b"content-range", content_range)]
    return 200, 0, size, []

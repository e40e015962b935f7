"""Which headers cross the proxy in each direction, and the HTTP semantics we compute ourselves
(ranges and conditionals, for origins that are not an HTTP server: the local directory).

Header names are lower-case bytes, as in ASGI scopes.
"""

from __future__ import annotations

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


def forward_headers(raw: Headers) -> dict[str, str]:
    """The request headers to pass upstream (absurdly long values are dropped, not sent)."""
    out: dict[str, str] = {}
    for name, value in raw:
        if name in FORWARD_REQUEST and len(value) <= MAX_HEADER_VALUE:
            out[name.decode("latin-1")] = value.decode("latin-1")
    return out


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

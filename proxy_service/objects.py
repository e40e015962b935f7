"""A bounded in-process cache of small hot objects (bytes, not URLs).

A 16 KiB image costs the upstream round trip more than anything else; serving it from memory
skips it. Freshness is bounded: a copy is served without asking the origin for at most
`object_cache_ttl` seconds after it was fetched or last validated; after that the next request
revalidates it with a conditional GET (a 304 extends it, anything else replaces or drops it).
So a replaced object is never served stale for longer than that bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .config import Config
from .headers import Headers, parse_http_date, select

# Headers a stored 200 carries; the length and range headers are computed per answer.
_STORED = frozenset(
    (b"content-type", b"etag", b"last-modified", b"accept-ranges", b"content-encoding")
)


@dataclass(slots=True)
class CachedObject:
    body: bytes
    headers: Headers
    etag: str
    mtime: float
    checked_at: float


class ObjectCache:
    def __init__(self, config: Config) -> None:
        self.max_bytes = config.object_cache_size
        self.max_object = config.object_cache_max_object
        self.ttl = config.object_cache_ttl
        self._items: OrderedDict[str, CachedObject] = OrderedDict()
        self._bytes = 0

    def get(self, image_id: str) -> CachedObject | None:
        obj = self._items.get(image_id)
        if obj is not None:
            self._items.move_to_end(image_id)
        return obj

    def fresh(self, obj: CachedObject, now: float) -> bool:
        return now - obj.checked_at < self.ttl

    def admit(self, image_id: str, headers: Headers, body: bytes, now: float) -> None:
        """Keep a complete 200 if it is small and has a validator to revalidate it with."""
        if len(body) > self.max_object:
            return
        etag = last_modified = None
        kept: Headers = []
        for name, value in headers:
            if name in _STORED:
                kept.append((name, value))
                if name == b"etag":
                    etag = value.decode("latin-1")
                elif name == b"last-modified":
                    last_modified = parse_http_date(value.decode("latin-1"))
        if etag is None:
            return
        self.drop(image_id)
        self._items[image_id] = CachedObject(body, kept, etag, last_modified or 0.0, now)
        self._bytes += len(body)
        while self._bytes > self.max_bytes and self._items:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted.body)

    def drop(self, image_id: str) -> None:
        obj = self._items.pop(image_id, None)
        if obj is not None:
            self._bytes -= len(obj.body)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def answer(self, obj: CachedObject, headers: dict[str, str]) -> tuple[int, Headers, bytes]:
        """Status, headers and body for a client's request, ranges and conditionals included."""
        size = len(obj.body)
        status, start, length, extra = select(headers, obj.etag, obj.mtime, size)
        if status == 304:
            return 304, [h for h in obj.headers if h[0] != b"content-type"] + extra, b""
        if status == 416:
            return 416, extra, b""
        out = [*obj.headers, *extra, (b"content-length", b"%d" % length)]
        return status, out, obj.body[start : start + length] if status == 206 else obj.body

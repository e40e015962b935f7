"""The hot path, GET/HEAD /images/<id>, as one raw ASGI callable, top to bottom:

check the id -> check the signature (when signing keys are set) -> URL cache (LRU -> Redis ->
sign) -> 302 to the presigned URL, or stream the origin's bytes with the client's conditional and
range headers, relaying 200/206/304/416, within the object size and in-flight limits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from typing import Any

from . import metrics
from .cache import UrlCache
from .config import Config
from .errors import (
    BadId,
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    ObjectTooLarge,
    Overloaded,
    ProxyError,
    StreamAborted,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
)
from .headers import Headers, request_headers
from .ids import parse_id
from .objects import CachedObject, ObjectCache
from .observe import Observer, Probe
from .params import Params
from .storage import Entry, Origin, OriginResponse

log = logging.getLogger("proxy_service.handler")
_OBJECT_HIT = metrics.Tally(metrics.OBJECT_CACHE.labels("hit"))
_OBJECT_MISS = metrics.Tally(metrics.OBJECT_CACHE.labels("miss"))
_OBJECT_REVALIDATED = metrics.Tally(metrics.OBJECT_CACHE.labels("revalidated"))
_OBJECT_STALE = metrics.Tally(metrics.OBJECT_CACHE.labels("stale"))

PREFIX = b"/images/"
PREFIX_LEN = len(PREFIX)
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_NO_STORE = (b"cache-control", b"no-store")
_DROP_ON_EMPTY = (b"content-length", b"content-type", b"content-encoding")
_TOTAL = re.compile(rb"/(\d+)$")  # the object size in a Content-Range

Scope = dict[str, Any]
Receive = Any
Send = Any


class ImageHandler:
    def __init__(
        self,
        config: Config,
        cache: UrlCache,
        origin: Origin,
        *,
        can_redirect: bool,
        objects: ObjectCache | None = None,
    ) -> None:
        self.cache = cache
        self.origin = origin
        self.objects = objects
        self._max_len = config.id_max_length
        self.params = Params(config, can_redirect=can_redirect)
        self._not_found_cc = (b"cache-control", b"public, max-age=%d" % config.not_found_max_age)
        self._redirect_max_age = config.redirect_max_age
        self._margin = config.expiry_margin
        self._max_size = config.max_object_size
        self._max_in_flight = config.max_in_flight
        self.in_flight = 0  # requests between asking the origin and the end of their response
        self.observer = Observer(
            config.access_log, gauges=[(metrics.POOL_IN_USE, lambda: origin.in_flight)]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        probe = Probe(send)
        send = probe
        method = scope["method"]
        image_id = ""
        mode = "stream"
        tier = ""
        try:
            if method != "GET" and method != "HEAD":
                raise MethodNotAllowed()
            headers = scope["headers"]
            # httptools buffers headers of any size: refuse what no image client sends.
            if (
                len(headers) > MAX_HEADERS
                or sum(len(n) + len(v) for n, v in headers) > MAX_HEADER_BYTES
            ):
                raise HeadersTooLarge()
            raw_path = scope["raw_path"]
            # Routed on the decoded path: `/%69mages/x` must not be sliced as if it were raw.
            if not raw_path.startswith(PREFIX):
                raise BadId("encoded /images/ prefix")
            image_id = parse_id(raw_path[PREFIX_LEN:], self._max_len)
            now = time.time()
            # `until`: a signed URL's expiry, which no cache may outlive.
            redirect, until = self.params.read(image_id, scope["query_string"], now)
            if redirect:
                mode = "redirect"
            entry, tier = await self.cache.get(image_id, now)
            entry = self.cache.for_method(entry, method, now)
            if redirect:
                await self._redirect(send, entry, method, now, until)
            else:
                # Refuse at once rather than queue: a backlog only grows while the origin is slow.
                if self._max_in_flight and self.in_flight >= self._max_in_flight:
                    raise Overloaded()
                self.in_flight += 1
                try:
                    await self._stream(scope, receive, send, image_id, entry, now, until)
                finally:
                    self.in_flight -= 1
        except ProxyError as exc:
            metrics.ERRORS.labels(exc.label).inc()
            await self._error(send, exc, image_id)
        except Exception as exc:
            metrics.ERRORS.labels("internal").inc()
            await self._internal_error(send, exc, image_id)
        finally:
            self.observer.observe(probe, method, mode, tier, image_id)

    async def _redirect(
        self, send: Send, entry: Entry, method: str, now: float, until: float | None
    ) -> None:
        # The 302 may be cached, but never beyond the life of the URL it points to (nor of the
        # signed URL it answers).
        max_age = int(min(self._redirect_max_age, entry.expires_at - self._margin - now))
        if until is not None:
            max_age = min(max_age, int(until - now))
        cc = b"public, max-age=%d" % max_age if max_age > 0 else b"no-store"
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [
                    (b"location", entry.url_for(method).encode()),
                    (b"cache-control", cc),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _open(
        self, image_id: str, entry: Entry, method: str, headers: dict[str, str], now: float
    ) -> OriginResponse:
        try:
            try:
                return await self.origin.open(entry, method, headers)
            except UpstreamForbidden as exc:
                # Expired, skewed or revoked signature: re-sign once, then give up (502).
                log.info("re-signing after %s", exc.detail, extra={"image_id": image_id})
                metrics.RESIGNS.inc()
                entry, _ = await self.cache.get(image_id, now, avoid=entry.url)
                entry = self.cache.for_method(entry, method, now)
                return await self.origin.open(entry, method, headers)
        except UpstreamNotFound:
            await self.cache.mark_missing(image_id, now)
            raise

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        image_id: str,
        entry: Entry,
        now: float,
        until: float | None,
    ) -> None:
        method = scope["method"]
        fwd = request_headers(scope["headers"], method)
        objects = self.objects
        if objects is not None:
            obj = objects.get(image_id)
            if obj is not None and not objects.fresh(obj, now):
                obj = await self._revalidate(image_id, entry, obj, now)
            if obj is not None:
                _OBJECT_HIT.inc()
                status, headers, body = objects.answer(obj, fwd)
                if status == 416:
                    body = b"range not satisfiable\n"
                    headers += [_TEXT, (b"content-length", b"%d" % len(body)), _NO_STORE]
                else:
                    headers.append(self.params.cache_control(until, now))
                await _respond(send, status, headers, body if method == "GET" else b"")
                return
            _OBJECT_MISS.inc()
        resp = await self._open(image_id, entry, method, fwd, now)
        watcher: asyncio.Task[None] | None = None
        try:
            status = resp.status
            headers = resp.headers
            if status == 416:
                headers = [h for h in headers if h[0] not in _DROP_ON_EMPTY]
                body = b"range not satisfiable\n"
                headers += [_TEXT, (b"content-length", b"%d" % len(body)), _NO_STORE]
                await _respond(send, status, headers, body)
                return
            limit = self._max_size
            size = _object_size(status, headers) if status != 304 else None
            if limit and size is not None and size > limit:
                raise ObjectTooLarge(f"object of {size} bytes")
            counting = bool(limit) and size is None and status != 304  # count bytes as they pass
            headers.append(self.params.cache_control(until, now))
            if status == 304:
                headers = [h for h in headers if h[0] not in _DROP_ON_EMPTY]
            if status == 304 or method == "HEAD":
                await _respond(send, status, headers, b"")
                return
            admit = (
                objects is not None
                and status == 200
                and method == "GET"
                and not fwd
                and size is not None
                and size <= objects.max_object
            )
            try:
                chunk = await resp.read()
                if admit:  # a whole small body, however the socket split it: read it all
                    parts = [chunk]
                    while not resp.at_eof():
                        parts.append(await resp.read())
                    chunk = b"".join(parts)
            except StreamAborted as exc:
                raise UpstreamError(str(exc)) from None
            sent = len(chunk)
            if counting and sent > limit:
                raise ObjectTooLarge("unannounced length over the limit")
            if resp.at_eof():  # small objects: one send, no disconnect watcher
                if admit and objects is not None:
                    objects.admit(image_id, headers, chunk, now)
                    metrics.OBJECT_CACHE_BYTES.set(objects.size_bytes)
                await _respond(send, status, headers, chunk)
                return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, resp))
            metrics.STREAMS.inc()
            try:
                while chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = await resp.read()
                    sent += len(chunk)
                    if counting and sent > limit:
                        # Too late for a status: drop the connection, as for a failed upstream.
                        log.warning(
                            "too_large: unannounced length over the limit",
                            extra={"image_id": image_id},
                        )
                        return
            except StreamAborted as exc:
                if watcher.done():
                    metrics.DISCONNECTS.inc()
                else:
                    # Returning without completing makes the server drop the connection, so a
                    # truncated body is never taken as whole.
                    metrics.UPSTREAM_ERRORS.labels("aborted").inc()
                    log.warning("stream aborted: %s", exc, extra={"image_id": image_id})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
                metrics.STREAMS.dec()
            resp.close()

    async def _revalidate(
        self, image_id: str, entry: Entry, obj: CachedObject, now: float
    ) -> CachedObject | None:
        """Ask the origin whether a stale copy is still current: a 304 keeps it another ttl."""
        resp = await self._open(image_id, entry, "GET", {"if-none-match": obj.etag}, now)
        resp.close()
        assert self.objects is not None
        if resp.status == 304:
            obj.checked_at = now
            _OBJECT_REVALIDATED.inc()
            return obj
        self.objects.drop(image_id)  # replaced: fetch it the normal way (and admit it again)
        _OBJECT_STALE.inc()
        return None

    async def _error(self, send: Send, exc: ProxyError, image_id: str) -> None:
        if exc.status >= 500:
            log.warning("%s: %s", exc.label, exc.detail, extra={"image_id": image_id})
        await self._send_error(send, exc)

    async def _internal_error(self, send: Send, exc: Exception, image_id: str) -> None:
        # A bug. Its message may quote a URL or header value: log the type and where it
        # happened (file, line, function; not even source lines), never the message.
        where = " <- ".join(
            f"{f.filename}:{f.lineno} {f.name}"
            for f in reversed(traceback.extract_tb(exc.__traceback__))
        )
        log.error(
            "internal: unhandled %s at %s", type(exc).__name__, where, extra={"image_id": image_id}
        )
        try:
            await self._send_error(send, ProxyError())
        except Exception:  # the response had started: returning drops the connection
            return

    async def _send_error(self, send: Send, exc: ProxyError) -> None:
        body = exc.message.encode() + b"\n"
        if isinstance(exc, NotFound):
            cc = self._not_found_cc
        else:
            cc = (b"cache-control", exc.cache_control.encode())
        headers = [_TEXT, (b"content-length", b"%d" % len(body)), cc, *exc.headers]
        await _respond(send, exc.status, headers, body)


def _object_size(status: int, headers: Headers) -> int | None:
    """The whole object's size, from Content-Range (206) or Content-Length (200, HEAD)."""
    length = None
    for name, value in headers:
        if name == b"content-range" and status == 206:
            total = _TOTAL.search(value)
            if total is not None:
                return int(total[1])
        elif name == b"content-length" and value.isdigit():
            length = int(value)
    return length


async def _respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _close_on_disconnect(receive: Receive, resp: OriginResponse) -> None:
    # uvicorn's send() is a silent no-op once the client is gone; only receive() tells us,
    # and closing the origin response is what frees (or drops) its upstream connection.
    while (await receive())["type"] != "http.disconnect":
        pass
    resp.close()

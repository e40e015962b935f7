"""The hot path, GET/HEAD /images/<id>, as one raw ASGI callable, top to bottom:

check the id -> URL cache (LRU -> Redis -> sign) -> 302 to the presigned URL, or stream the
origin's bytes with the client's conditional and range headers, relaying 200/206/304/416.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .cache import UrlCache
from .config import Config
from .errors import (
    BadRequest,
    MethodNotAllowed,
    ModeUnavailable,
    NotFound,
    ProxyError,
    StreamAborted,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
)
from .headers import Headers, forward_headers
from .ids import parse_id
from .storage import Entry, Origin, OriginResponse

log = logging.getLogger("proxy_service.handler")

PREFIX_LEN = len(b"/images/")
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_NO_STORE = (b"cache-control", b"no-store")
_DROP_ON_EMPTY = (b"content-length", b"content-type", b"content-encoding")

Scope = dict[str, Any]
Receive = Any
Send = Any


class ImageHandler:
    def __init__(
        self, config: Config, cache: UrlCache, origin: Origin, *, can_redirect: bool
    ) -> None:
        self.cache = cache
        self.origin = origin
        self._max_len = config.id_max_length
        self._redirect_default = config.mode == "redirect"
        self._override = config.allow_mode_override
        self._can_redirect = can_redirect
        self._success_cc = (b"cache-control", config.cache_control.encode())
        self._not_found_cc = (b"cache-control", b"public, max-age=%d" % config.not_found_max_age)
        self._redirect_max_age = config.redirect_max_age
        self._margin = config.expiry_margin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        image_id = ""
        try:
            if method != "GET" and method != "HEAD":
                raise MethodNotAllowed()
            image_id = parse_id(scope["raw_path"][PREFIX_LEN:], self._max_len)
            redirect = self._wants_redirect(scope["query_string"])
            now = time.time()
            entry, _tier = await self.cache.get(image_id, now)
            if redirect:
                await self._redirect(send, entry, method, now)
            else:
                await self._stream(scope, receive, send, image_id, entry, now)
        except ProxyError as exc:
            await self._error(send, exc, image_id)

    def _wants_redirect(self, query: bytes) -> bool:
        if not (self._override and query):
            return self._redirect_default
        mode = b""
        for pair in query.split(b"&"):
            if pair.startswith(b"mode="):
                mode = pair[5:]
        if mode == b"redirect":
            if not self._can_redirect:
                raise ModeUnavailable()
            return True
        if mode == b"stream":
            return False
        if mode:
            raise BadRequest("unknown mode")
        return self._redirect_default

    async def _redirect(self, send: Send, entry: Entry, method: str, now: float) -> None:
        # The 302 may be cached, but never beyond the life of the URL it points to.
        max_age = int(min(self._redirect_max_age, entry.expires_at - self._margin - now))
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
                entry, _ = await self.cache.get(image_id, now, avoid=entry.url)
                return await self.origin.open(entry, method, headers)
        except UpstreamNotFound:
            await self.cache.mark_missing(image_id, now)
            raise

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, image_id: str, entry: Entry, now: float
    ) -> None:
        method = scope["method"]
        resp = await self._open(image_id, entry, method, forward_headers(scope["headers"]), now)
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
            headers.append(self._success_cc)
            if status == 304:
                headers = [h for h in headers if h[0] not in _DROP_ON_EMPTY]
            if status == 304 or method == "HEAD":
                await _respond(send, status, headers, b"")
                return
            try:
                chunk = await resp.read()
            except StreamAborted as exc:
                raise UpstreamError(str(exc)) from None
            if resp.at_eof():  # small objects: one send, no disconnect watcher
                await _respond(send, status, headers, chunk)
                return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, resp))
            try:
                while chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = await resp.read()
            except StreamAborted as exc:
                if not watcher.done():
                    # Returning without completing makes the server drop the connection, so a
                    # truncated body is never taken as whole.
                    log.warning("stream aborted: %s", exc, extra={"image_id": image_id})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
            resp.close()

    async def _error(self, send: Send, exc: ProxyError, image_id: str) -> None:
        if exc.status >= 500:
            log.warning("%s: %s", exc.label, exc.detail, extra={"image_id": image_id})
        body = exc.message.encode() + b"\n"
        if isinstance(exc, NotFound):
            cc = self._not_found_cc
        else:
            cc = (b"cache-control", exc.cache_control.encode())
        headers = [_TEXT, (b"content-length", b"%d" % len(body)), cc, *exc.headers]
        await _respond(send, exc.status, headers, body)


async def _respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _close_on_disconnect(receive: Receive, resp: OriginResponse) -> None:
    # uvicorn's send() is a silent no-op once the client is gone; only receive() tells us,
    # and closing the origin response is what frees (or drops) its upstream connection.
    while (await receive())["type"] != "http.disconnect":
        pass
    resp.close()

"""The pooled upstream HTTP client (one aiohttp session per process) and its error mapping.

aiohttp rather than httpx: on this machine a shared pooled httpx 0.29 client proxied ~100 req/s
of 16 KiB images where one aiohttp session did ~5 000 (see README, Performance).
Exceptions never leave this module untranslated, and none carries the presigned URL.
Only well-formed Range and conditional headers go upstream: the origin never parses client junk.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
from yarl import URL

from . import metrics
from .config import Config
from .errors import (
    Overloaded,
    StreamAborted,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamTimeout,
)
from .headers import RELAY_RESPONSE
from .storage import Entry

log = logging.getLogger("proxy_service.upstream")
_ERR_CONNECT = metrics.UPSTREAM_ERRORS.labels("connect")
_ERR_TIMEOUT = metrics.UPSTREAM_ERRORS.labels("timeout")
_ERR_5XX = metrics.UPSTREAM_ERRORS.labels("5xx")
_RESPONSES: dict[str, metrics.Tally] = {}  # by status class, made on first sight

RELAYED_STATUS = frozenset((200, 206, 304, 416))
_COS_CODE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")


class HttpResponse:
    def __init__(self, origin: HttpOrigin, resp: aiohttp.ClientResponse) -> None:
        self.status = resp.status
        self.headers = [
            (name.lower(), value)
            for name, value in resp.raw_headers
            if name.lower() in RELAY_RESPONSE
        ]
        self._resp: aiohttp.ClientResponse | None = resp
        self._content = resp.content
        self._origin = origin

    async def read(self) -> bytes:
        # readchunk hands over what one socket read delivered, as received; readany would join
        # every buffered piece into a new bytes object first: a copy that cost up to 2.5x the
        # CPU of a 4 MiB relay when the reader fell behind (measured; see README, Performance).
        try:
            while True:
                data, end_of_http_chunk = await self._content.readchunk()
                if data or not end_of_http_chunk:  # (b"", True) only marks a chunk boundary
                    return data
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise StreamAborted(f"upstream body failed: {type(exc).__name__}") from None

    def at_eof(self) -> bool:
        return self._content.at_eof()

    def close(self) -> None:
        resp, self._resp = self._resp, None
        if resp is None:
            return
        self._origin._open -= 1
        if self._content.at_eof():
            resp.release()  # body complete: the connection goes back to the pool
        else:
            resp.close()  # unread body: drop the connection rather than drain it for nobody


class HttpOrigin:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._retries = config.upstream_retries
        self._pool_size = config.upstream_pool_size
        self._open = 0
        self._waiting = 0  # requests sent that have no response yet

    @property
    def in_flight(self) -> int:
        return self._open

    async def start(self) -> None:
        c = self._config
        connector = aiohttp.TCPConnector(
            limit=c.upstream_pool_size, keepalive_timeout=30, ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                # `connect` includes the wait for a free pooled connection: bounded, never a queue.
                connect=c.upstream_connect_timeout,
                sock_connect=c.upstream_connect_timeout,
                sock_read=c.upstream_read_timeout,
            ),
            auto_decompress=False,  # relay bytes as stored, Content-Encoding and all
            read_bufsize=c.upstream_read_size,
            skip_auto_headers=("Accept-Encoding",),
            headers={"User-Agent": "proxy-service"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(self, entry: Entry, method: str, headers: dict[str, str]) -> HttpResponse:
        assert self._session is not None, "HttpOrigin.start() was not awaited"
        url = URL(entry.url_for(method), encoded=True)  # presigned: must not be re-quoted
        attempt = 0
        while True:
            pool_full = self._open + self._waiting >= self._pool_size
            self._waiting += 1
            try:
                resp = await self._session.request(
                    method, url, headers=headers, allow_redirects=False
                )
            except aiohttp.ConnectionTimeoutError:
                if pool_full:
                    # Waited for a pooled connection, not for the origin: our capacity, not theirs.
                    raise Overloaded("no free upstream connection in time") from None
                _ERR_TIMEOUT.inc()
                error: UpstreamError | UpstreamTimeout = UpstreamTimeout("no connection in time")
            except TimeoutError:
                _ERR_TIMEOUT.inc()
                error = UpstreamTimeout("no response in time")
            except aiohttp.ClientError as exc:
                _ERR_CONNECT.inc()
                error = UpstreamError(f"upstream request failed: {type(exc).__name__}")
            else:
                status = resp.status
                klass = metrics.status_class(status)
                tally = _RESPONSES.get(klass)
                if tally is None:
                    tally = _RESPONSES[klass] = metrics.Tally(metrics.UPSTREAM.labels(klass))
                tally.inc()
                if status in RELAYED_STATUS:
                    self._open += 1
                    return HttpResponse(self, resp)
                if status == 403:
                    raise UpstreamForbidden(f"upstream 403 {await _cos_code(resp)}")
                resp.close()
                if status == 404:
                    raise UpstreamNotFound()
                if status < 500:
                    raise UpstreamError(f"unexpected upstream status {status}")
                _ERR_5XX.inc()
                error = UpstreamError(f"upstream status {status}")
            finally:
                self._waiting -= 1
            if attempt >= self._retries:
                raise error
            attempt += 1
            metrics.RETRIES.inc()
            log.info("retrying upstream (%s), attempt %d", error.detail, attempt + 1)
            await asyncio.sleep(0.05 * attempt)


async def _cos_code(resp: aiohttp.ClientResponse) -> str:
    """COS's error code (e.g. AccessDenied, SignatureDoesNotMatch) for the logs."""
    try:
        body = await asyncio.wait_for(resp.content.read(4096), 1.0)
    except (TimeoutError, aiohttp.ClientError):
        body = b""
    finally:
        resp.close()
    match = _COS_CODE.search(body)
    return match.group(1).decode() if match else "unknown"

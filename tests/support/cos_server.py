"""A local COS-compatible origin for end-to-end tests.

``CosTestServer`` serves the files under a directory over real sockets on
127.0.0.1, from a background thread running its own event loop, so it works
from plain sync tests and next to code running its own loop.  Every request
must carry a valid COS V5 signature (``q-sign-algorithm=sha1``), either in
presigned-URL query parameters or in the ``Authorization`` header; the
bucket is not part of the URL (the SDK is pointed at ``Domain=server.domain``).

Typical use::

    with CosTestServer(tmp_path) as cos:
        cos.put("images/a.png", b"...")
        url = cos.presign("images/a.png")  # real SDK, GET, 60 s
        # or, with the SDK directly:
        client = make_client(cos)  # qcloud_cos.CosS3Client
        url = client.get_presigned_url(
            Bucket=BUCKET, Key="images/a.png", Method="GET", Expired=60
        )

STS: set ``cos.require_token = "tok"`` and presign with
``params={"x-cos-security-token": "tok"}``.  The SDK does *not* add
``CosConfig(Token=...)`` to presigned URLs by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import mimetypes
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate, mktime_tz, parsedate_tz
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from aiohttp import web
from qcloud_cos import CosConfig, CosS3Client  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "BUCKET",
    "DEFAULT_SECRET_ID",
    "DEFAULT_SECRET_KEY",
    "REGION",
    "CosTestServer",
    "RecordedRequest",
    "cos_signature",
    "make_client",
    "pattern",
]

BUCKET = "test-1250000000"
REGION = "ap-guangzhou"
DEFAULT_SECRET_ID = "AKIDcostestserver"
DEFAULT_SECRET_KEY = "cos-test-server-secret-key"
TOKEN_NAME = "x-cos-security-token"
CHUNK_SIZE = 256 * 1024
_SAFE = "-_.~"  # the SDK's quote() safe set for signed names and values
_PATTERN_BLOCK = bytes(range(251))  # prime length, so offsets show in the data
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("InvalidArgument", "Invalid argument."),
    403: ("AccessDenied", "Access Denied."),
    404: ("NoSuchKey", "The specified key does not exist."),
    405: ("MethodNotAllowed", "The specified method is not allowed."),
    416: ("InvalidRange", "The requested range is not satisfiable."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def cos_signature(
    secret_key: str,
    method: str,
    path: str,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    key_time: str,
    sign_time: str | None = None,
) -> str:
    """COS V5 ``q-signature``, computed the way cos_auth.CosS3Auth does.

    ``path`` is the decoded object path (``/`` + key).  ``params`` and
    ``headers`` hold only the signed entries, with names as they appear in
    ``q-url-param-list`` / ``q-header-list`` (lower-cased, quoted) and raw
    values.
    """

    def canonical(pairs: Mapping[str, str]) -> str:
        quoted = sorted((k, quote(v, safe=_SAFE)) for k, v in pairs.items())
        return "&".join(f"{k}={v}" for k, v in quoted)

    http_string = f"{method.lower()}\n{path}\n{canonical(params)}\n{canonical(headers)}\n"
    digest = hashlib.sha1(http_string.encode()).hexdigest()
    string_to_sign = f"sha1\n{sign_time or key_time}\n{digest}\n"
    sign_key = hmac.new(secret_key.encode(), key_time.encode(), "sha1").hexdigest()
    return hmac.new(sign_key.encode(), string_to_sign.encode(), "sha1").hexdigest()


def pattern(start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of the content written by ``put_pattern``."""
    offset = start % len(_PATTERN_BLOCK)
    length = stop - start
    repeats = (offset + length) // len(_PATTERN_BLOCK) + 1
    return (_PATTERN_BLOCK * repeats)[offset : offset + length]


def make_client(
    server: CosTestServer,
    secret_id: str | None = None,
    secret_key: str | None = None,
) -> CosS3Client:
    """A real ``CosS3Client`` pointed at ``server`` (use ``Bucket=BUCKET``)."""
    config = CosConfig(
        Region=REGION,
        SecretId=secret_id or server.secret_id,
        SecretKey=secret_key or server.secret_key,
        Domain=server.domain,
        Scheme="http",
    )
    return CosS3Client(config)


@dataclass
class RecordedRequest:
    """One request as the server saw it.

    ``status`` is 0 until the response status is decided, and stays 0 for
    dropped connections; ``error_code`` is the COS error code sent, if any
    (handy for HEAD, whose error has no body).  ``time`` is
    ``time.monotonic()`` at arrival.
    """

    method: str
    path: str
    key: str
    query: dict[str, str]
    headers: dict[str, str]
    time: float
    status: int = 0
    error_code: str | None = None


class CosError(Exception):
    def __init__(
        self,
        status: int,
        code: str | None = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        phrase = _phrase(status)
        default_code, default_message = _ERRORS.get(status, (phrase.replace(" ", ""), phrase))
        self.status = status
        self.code = code or default_code
        self.message = message or default_message
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.code}: {self.message}")


@dataclass(frozen=True)
class _Fault:
    kind: Literal["fail", "stall", "drop"]
    status: int = 0
    seconds: float = 0.0
    code: str | None = None
    message: str | None = None


class CosTestServer:
    """COS-compatible origin serving ``root/<key>`` files; see module doc.

    Fault injection is thread-safe.  ``fail_next``, ``stall_next`` and
    ``drop_next`` queue up in call order and each request takes the next one;
    ``abort_next_after`` has its own queue, taken by object bodies only (so a
    HEAD or an error in between does not use it up).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        secret_id: str = DEFAULT_SECRET_ID,
        secret_key: str = DEFAULT_SECRET_KEY,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.credentials: dict[str, str] = {secret_id: secret_key}
        self.clock: Callable[[], float] = time.time
        self.max_clock_skew = 900.0
        self.require_token: str | None = None
        self.extra_headers: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        self.open_streams = 0
        self.completed_streams = 0
        self.aborted_streams = 0
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._aborts: deque[int] = deque()
        self._trickles: deque[tuple[int, float]] = deque()
        self._md5_cache: dict[tuple[str, int, int], str] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> CosTestServer:
        if self._thread is not None:
            raise RuntimeError("CosTestServer is already running")
        sock = socket.create_server(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"cos-test-{self._port}"
        )
        self._thread.start()
        try:
            ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=10)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if thread.is_alive():
            assert self._loop is not None
            assert self._stopping is not None
            self._loop.call_soon_threadsafe(self._stopping.set)
            thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("CosTestServer did not stop within 10 s")

    def __enter__(self) -> CosTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("CosTestServer has not been started")
        return self._port

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.domain}"

    # -- objects -------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """Where the object ``key`` lives under ``root``."""
        path = Path(os.path.normpath(self.root / key.lstrip("/")))
        if key.endswith("/") or path == self.root or not path.is_relative_to(self.root):
            raise ValueError(f"not a valid object key: {key!r}")
        return path

    def put(self, key: str, data: bytes) -> Path:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def put_pattern(self, key: str, size: int) -> Path:
        """Write a ``size``-byte object whose bytes are ``pattern(0, size)``."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        step = len(_PATTERN_BLOCK) * 4096
        with path.open("wb") as f:
            for start in range(0, size, step):
                f.write(pattern(start, min(start + step, size)))
        return path

    def presign(
        self,
        key: str,
        *,
        method: str = "GET",
        expires: int = 60,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        secret_id: str | None = None,
        secret_key: str | None = None,
    ) -> str:
        """A presigned URL made by the real SDK."""
        client = make_client(self, secret_id, secret_key)
        return str(
            client.get_presigned_url(
                Bucket=BUCKET,
                Key=key,
                Method=method,
                Expired=expires,
                Params=dict(params or {}),
                Headers=dict(headers or {}),
            )
        )

    # -- fault injection and observation -------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests with a COS error ``status``."""
        self._queue(_Fault("fail", status=status, code=code, message=message), count)

    def stall_next(self, seconds: float, count: int = 1) -> None:
        """Sleep before handling (and answering) the next ``count`` requests."""
        self._queue(_Fault("stall", seconds=seconds), count)

    def drop_next(self, count: int = 1) -> None:
        """Close the next ``count`` connections without any response."""
        self._queue(_Fault("drop"), count)

    def abort_next_after(self, nbytes: int, count: int = 1) -> None:
        """Cut the next ``count`` object bodies after ``nbytes`` bytes.

        Headers still announce the full Content-Length; the connection is
        closed once ``nbytes`` body bytes have been written.
        """
        with self._lock:
            self._aborts.extend([nbytes] * count)

    def trickle_next(self, piece: int, pause: float, count: int = 1) -> None:
        """Write the next ``count`` object bodies ``piece`` bytes at a time, pausing ``pause``
        seconds between writes: the client receives them in many socket reads."""
        with self._lock:
            self._trickles.extend([(piece, pause)] * count)

    def reset(self) -> None:
        """Forget recorded requests, counters and pending faults."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._aborts.clear()
            self._trickles.clear()
            self.completed_streams = self.aborted_streams = 0

    @staticmethod
    def wait_until(
        predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(interval)

    def _queue(self, fault: _Fault, count: int) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    # -- server thread -------------------------------------------------------

    def _run(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        try:
            # Always the stock selector loop, whatever loop policy a test installs.
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                runner.run(self._serve(sock, ready))
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = web.Server(self._handle, access_log=None)
        # A short timeout: at stop, in-flight (e.g. stalled) handlers are
        # cancelled instead of being waited for.
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            ready.set_result(None)
            await self._stopping.wait()
            # Closing the listener while a just-accepted connection is still
            # being set up leaks that socket (asyncio on 3.11), so stop
            # accepting and let such connections reach aiohttp first.
            self._loop.remove_reader(sock)
            for _ in range(2):
                await asyncio.sleep(0)
        finally:
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        # The SDK signs the key as given, not percent-encoded.
        path = unquote(raw_path)
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RecordedRequest(request.method, path, path[1:], query, headers, time.monotonic())
        with self._lock:
            self.requests.append(record)
            fault = self._faults.popleft() if self._faults else None
        try:
            if fault is not None and fault.kind == "drop":
                if request.transport is not None:
                    request.transport.close()
                # aiohttp finds the transport closed and gives up quietly.
                return web.Response()
            if fault is not None and fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
            if fault is not None and fault.kind == "fail":
                raise CosError(fault.status, fault.code, fault.message)
            if request.method not in ("GET", "HEAD"):
                raise CosError(405, headers={"Allow": "GET, HEAD"})
            self._authenticate(request, path, query)
            return await self._serve_object(request, record)
        except CosError as err:
            record.status, record.error_code = err.status, err.code
            return _error_response(err, f"{request.host}{path}")

    def _authenticate(self, request: web.BaseRequest, path: str, query: Mapping[str, str]) -> None:
        if "q-signature" in query:
            auth = {k: v for k, v in query.items() if k.startswith("q-")}
        else:
            fields = request.headers.get("Authorization", "").split("&")
            auth = {k: v for k, _, v in (f.partition("=") for f in fields)}
        if not auth.get("q-signature"):
            raise CosError(403, "AccessDenied", "Request has no signature.")
        secret_key = self.credentials.get(auth.get("q-ak", ""))
        if secret_key is None:
            raise CosError(
                403,
                "InvalidAccessKeyId",
                "The Access Key Id you provided does not exist in our records.",
            )
        try:
            sign_time, key_time = auth["q-sign-time"], auth["q-key-time"]
            sign_start, sign_end = _time_range(sign_time)
            key_start, key_end = _time_range(key_time)
        except (KeyError, ValueError):
            raise CosError(403, "AccessDenied", "Authorization is malformed.") from None

        mismatch = CosError(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature "
            "you provided. Check your key and signing method.",
        )
        params = {quote(k, safe=_SAFE).lower(): v for k, v in query.items()}
        headers = {quote(k, safe=_SAFE).lower(): v for k, v in request.headers.items()}
        if "host" in headers:
            # The SDK signs the URL's hostname: no port, lower-cased.
            headers["host"] = _hostname(headers["host"])
        try:
            signed_params = {n: params[n] for n in _names(auth, "q-url-param-list")}
            signed_headers = {n: headers[n] for n in _names(auth, "q-header-list")}
        except KeyError:
            raise mismatch from None
        expected = cos_signature(
            secret_key,
            request.method,
            path,
            signed_params,
            signed_headers,
            key_time,
            sign_time,
        )
        given = auth["q-signature"]
        if auth.get("q-sign-algorithm") != "sha1" or not hmac.compare_digest(
            expected.encode(), given.encode()
        ):
            raise mismatch

        now = self.clock()
        if now > min(sign_end, key_end):
            raise CosError(403, "AccessDenied", "Request has expired")
        if max(sign_start, key_start) > now + self.max_clock_skew:
            raise CosError(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the server's time is too large.",
            )
        token = self.require_token
        if token is not None and token not in (
            signed_params.get(TOKEN_NAME),
            signed_headers.get(TOKEN_NAME),
        ):
            raise CosError(403, "InvalidAccessKeyId", "The security token is missing or invalid.")

    async def _serve_object(
        self, request: web.BaseRequest, record: RecordedRequest
    ) -> web.StreamResponse:
        try:
            path = self.path_for(record.key)
            f = path.open("rb")
        except (OSError, ValueError):
            raise CosError(404) from None
        with f:
            st = os.fstat(f.fileno())
            etag = await self._etag(str(path), st)
            headers = {
                "ETag": etag,
                "Last-Modified": formatdate(st.st_mtime, usegmt=True),
                "Server": "tencent-cos",
                "x-cos-request-id": _request_id(),
                **self.extra_headers,
            }
            if _not_modified(request, etag, st.st_mtime):
                record.status = 304
                return web.Response(status=304, headers=headers)

            content_type = mimetypes.guess_type(record.key)[0]
            headers = {
                "Content-Type": content_type or "application/octet-stream",
                "Accept-Ranges": "bytes",
                "x-cos-hash-crc64ecma": "0",
                **headers,
            }
            status, start, stop = 200, 0, st.st_size
            if _if_range_matches(request.headers.get("If-Range"), etag, st.st_mtime):
                byte_range = _byte_range(request.headers.get("Range"), st.st_size)
                if byte_range is not None:
                    status, (start, stop) = 206, byte_range
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{st.st_size}"
            record.status = status
            return await self._send_file(request, status, headers, f, start, stop)

    async def _send_file(
        self,
        request: web.BaseRequest,
        status: int,
        headers: dict[str, str],
        f: BinaryIO,
        start: int,
        stop: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length = stop - start
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        with self._lock:
            cut = self._aborts.popleft() if self._aborts else None
            piece, pause = self._trickles.popleft() if self._trickles else (CHUNK_SIZE, 0.0)
        limit = length if cut is None else min(cut, length)
        sent = 0
        done = False
        self.open_streams += 1
        try:
            await response.prepare(request)
            await response.write(b"")  # flushes the headers, even if no body follows
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(piece, limit - sent))
                if not chunk:
                    break
                await response.write(chunk)  # waits while the client lags behind
                sent += len(chunk)
                if pause:
                    await asyncio.sleep(pause)
            if sent == length:
                await response.write_eof()
                done = True
        except ConnectionError:
            pass  # the client went away; counted as aborted below
        finally:
            self.open_streams -= 1
            if done:
                self.completed_streams += 1
            else:
                self.aborted_streams += 1
        if not done and request.transport is not None:
            request.transport.close()
        return response

    async def _etag(self, path: str, st: os.stat_result) -> str:
        cache_key = (path, st.st_mtime_ns, st.st_size)
        digest = self._md5_cache.get(cache_key)
        if digest is None:
            digest = await asyncio.to_thread(_md5_file, path)
            self._md5_cache[cache_key] = digest
        return f'"{digest}"'


def _error_response(err: CosError, resource: str) -> web.Response:
    request_id = _request_id()
    trace_id = secrets.token_hex(32)
    body = (
        "<?xml version='1.0' encoding='utf-8' ?>\n"
        f"<Error><Code>{escape(err.code)}</Code>"
        f"<Message>{escape(err.message)}</Message>"
        f"<Resource>{escape(resource)}</Resource>"
        f"<RequestId>{request_id}</RequestId>"
        f"<TraceId>{trace_id}</TraceId></Error>"
    )
    headers = {
        "Content-Type": "application/xml",
        "Server": "tencent-cos",
        "x-cos-request-id": request_id,
        "x-cos-trace-id": trace_id,
        **err.headers,
    }
    return web.Response(status=err.status, body=body.encode(), headers=headers)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a single byte range; None means ignore the header."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    unsatisfiable = CosError(416, headers={"Content-Range": f"bytes */{size}"})
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise unsatisfiable
    return start, min(int(last) + 1, size) if last else size


def _not_modified(request: web.BaseRequest, etag: str, mtime: float) -> bool:
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = _http_time(request.headers.get("If-Modified-Since"))
    return since is not None and int(mtime) <= since


def _if_range_matches(if_range: str | None, etag: str, mtime: float) -> bool:
    if if_range is None:
        return True
    if if_range.startswith(('"', "W/")):
        return if_range == etag
    return _http_time(if_range) == int(mtime)


def _http_time(value: str | None) -> int | None:
    parsed = parsedate_tz(value) if value else None
    return None if parsed is None else mktime_tz(parsed)


def _time_range(value: str) -> tuple[int, int]:
    start, end = value.split(";")
    return int(start), int(end)


def _names(auth: Mapping[str, str], field: str) -> list[str]:
    return [name for name in auth.get(field, "").split(";") if name]


def _hostname(host: str) -> str:
    try:
        return urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return host


def _md5_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _request_id() -> str:
    return secrets.token_urlsafe(30)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"

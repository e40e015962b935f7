"""The embedded default: objects are files under a directory root.

Served with the same HTTP semantics as COS (ETag, Last-Modified, Range, conditionals), so
everything above the `Origin` seam behaves the same. There is no URL to redirect to.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..config import Config
from ..errors import StreamAborted, UpstreamError, UpstreamNotFound
from ..headers import Headers, http_date, select
from .base import Entry


class LocalSigner:
    def __init__(self, config: Config) -> None:
        self._expires = config.sign_expires

    def sign(self, key: str, now: float) -> Entry:
        return Entry(key=key, url="", head_url="", expires_at=now + self._expires, signed_at=now)

    def head_url(self, entry: Entry, now: float) -> str:
        return ""


class FileResponse:
    def __init__(
        self,
        status: int,
        headers: Headers,
        file: BinaryIO | None = None,
        remaining: int = 0,
        chunk: int = 0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._file = file
        self._remaining = remaining
        self._chunk = chunk
        self._on_close = on_close

    async def read(self) -> bytes:
        if self._file is None or self._remaining <= 0:
            return b""
        try:
            data = await asyncio.to_thread(self._file.read, min(self._chunk, self._remaining))
        except (OSError, ValueError):
            raise StreamAborted("local read failed") from None
        if not data:
            raise StreamAborted("file shrank while being read")
        self._remaining -= len(data)
        return data

    def at_eof(self) -> bool:
        return self._remaining <= 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class LocalOrigin:
    def __init__(self, config: Config) -> None:
        self._root = Path(config.local_root).resolve()
        self._chunk = config.upstream_read_size
        self._open = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    @property
    def in_flight(self) -> int:
        return self._open

    async def open(self, entry: Entry, method: str, headers: dict[str, str]) -> FileResponse:
        path = self._root / entry.key
        try:
            file, st = await asyncio.to_thread(_open, path, self._root)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise UpstreamNotFound() from None
        except OSError as exc:
            raise UpstreamError(f"local open failed: {type(exc).__name__}") from None
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        content_type = mimetypes.guess_type(entry.key)[0] or "application/octet-stream"
        meta = [
            (b"etag", etag.encode()),
            (b"last-modified", http_date(st.st_mtime).encode()),
            (b"accept-ranges", b"bytes"),
        ]
        status, start, length, extra = select(headers, etag, st.st_mtime, size)
        if status in (304, 416):
            file.close()
            return FileResponse(status, meta + extra)
        meta += extra
        meta += [(b"content-type", content_type.encode()), (b"content-length", b"%d" % length)]
        if method == "HEAD":
            file.close()
            return FileResponse(status, meta)
        if start:
            file.seek(start)
        self._open += 1
        return FileResponse(status, meta, file, length, self._chunk, self._closed)

    def _closed(self) -> None:
        self._open -= 1


def _open(path: Path, root: Path) -> tuple[BinaryIO, os.stat_result]:
    # The id check already forbids traversal; resolving symlinks here keeps the root a jail too.
    real = path.resolve()
    # Regular files only: opening a FIFO or device would block a worker thread for good.
    if not real.is_relative_to(root) or not stat.S_ISREG(os.stat(real).st_mode):
        raise FileNotFoundError(str(path))
    file = open(real, "rb")  # noqa: SIM115 - closed by FileResponse.close
    return file, os.fstat(file.fileno())

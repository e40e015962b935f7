"""A real browser for tests: Debian's Chromium driven by Playwright, PNGs made here, and a tiny
page server on 127.0.0.1 (another origin than the proxy, as a real site would be).

No browser is ever downloaded: Playwright drives `/usr/bin/chromium` (apt-get install chromium).
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str:
    """Debian's chromium; skips the test when it is not installed."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("chromium is not installed (.ci/run installs it: apt-get install -y chromium)")


def png(width: int, height: int, *, color_type: int = 2, seed: int = 0) -> bytes:
    """A valid 8-bit PNG with a gradient: grey (0), RGB (2) or RGBA (6)."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: none
        for x in range(width):
            pixel = (
                (x * 255 // max(1, width - 1) + seed) % 256,
                (y * 255 // max(1, height - 1) + seed * 7) % 256,
                (seed * 37 + x + y) % 256,
                255 - (x + y) % 128,
            )
            rows.extend(pixel[:channels])

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


class PageServer:
    """Serves fixed pages (path -> HTML) from a thread; `url(path)` is where the browser goes."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                page = server.pages.get(self.path)
                body = (page if page is not None else "not found\n").encode()
                self.send_response(200 if page is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

"""The built-in origin, used when nginx is not installed: a keep-alive HTTP/1.1 file server.

`python -m benchmarks.fileserver --root DIR --port N --redirect-location URL`

Like the nginx origin it ignores query strings (so COS-style presigned URLs just work), serves
`/<file>` from DIR, any `/miss/<anything>` as `small.bin` (every id a new one for the proxy), and
answers `/redirect/<anything>` with a 302 to `--redirect-location`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hashlib
from pathlib import Path

from . import aio

MEMORY_LIMIT = 64 * 1024 * 1024  # larger files are streamed from disk
SLICE = 256 * 1024  # large bodies go out in slices with drain(), so memory stays bounded


class Files:
    def __init__(self, root: Path, redirect_location: str) -> None:
        self.root = root
        self.redirect = (
            b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
            % redirect_location.encode()
        )
        self.cache: dict[str, tuple[bytes, bytes | None, Path]] = {}
        for path in sorted(root.iterdir()):
            if path.is_file():
                self.cache[path.name] = self._load(path)

    @staticmethod
    def _load(path: Path) -> tuple[bytes, bytes | None, Path]:
        st = path.stat()
        etag = hashlib.sha1(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {st.st_size}\r\n"
            f'ETag: "{etag}"\r\n'
            f"Last-Modified: {email.utils.formatdate(st.st_mtime, usegmt=True)}\r\n"
            "Accept-Ranges: none\r\n\r\n"
        ).encode()
        body = path.read_bytes() if st.st_size <= MEMORY_LIMIT else None
        return head, body, path

    def lookup(self, path: str) -> tuple[bytes, bytes | None, Path] | None:
        if path.startswith("/miss/"):
            return self.cache.get("small.bin")
        name = path[1:]
        if "/" in name:
            return None
        return self.cache.get(name)


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n"


async def handle(files: Files, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].partition(b"?")[0].decode("latin-1")
            close = b"\r\nconnection: close" in head.lower()
            if target.startswith("/redirect/"):
                writer.write(files.redirect)
            else:
                found = files.lookup(target)
                if found is None:
                    writer.write(NOT_FOUND)
                else:
                    header, body, path = found
                    if method == b"HEAD":
                        writer.write(header)
                    elif body is not None and len(body) <= SLICE:
                        writer.write(header + body)
                    else:
                        writer.write(header)
                        await _send_body(writer, body, path)
            await writer.drain()
            if close:
                return
    except ConnectionError:
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _send_body(writer: asyncio.StreamWriter, body: bytes | None, path: Path) -> None:
    if body is not None:
        view = memoryview(body)
        for i in range(0, len(view), SLICE):
            writer.write(view[i : i + SLICE])
            await writer.drain()
        return
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            writer.write(chunk)
            await writer.drain()


async def serve(root: Path, port: int, redirect_location: str) -> None:
    files = Files(root, redirect_location)
    server = await asyncio.start_server(
        lambda r, w: handle(files, r, w), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fileserver")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redirect-location", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        aio.run(serve(args.root, args.port, args.redirect_location))


if __name__ == "__main__":
    main()

"""The bundled load generator, used when wrk is not installed and for the slow/huge scenarios.

`python -m benchmarks.loadgen --port N --path /images/x [options]` prints one JSON object:
requests, errors (and their kinds), bytes, elapsed, p50/p99 latency in ms, statuses.

- default: N keep-alive connections (asyncio protocols) issuing GETs back to back for a duration,
  or until `--requests` responses have completed;
- `--vary`: the path is a prefix and each request appends a new counter (every id a new one);
- `--slow-read B --slow-interval S`: each connection reads B bytes, then sleeps S seconds, with a
  receive buffer of B bytes, so the server really has to hold back (a slow mobile client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from . import aio

MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    pass


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes: int = 0

    def report(self, elapsed: float) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:  # nearest-rank
            return lat[max(0, math.ceil(p * len(lat)) - 1)] * 1000 if lat else 0.0

        return {
            "requests": len(lat),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "bytes": self.bytes,
            "elapsed": elapsed,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server will close, from a response head."""
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise ProtocolError("bad status line")
    status = int(status_line[1])
    length = -1
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"transfer-encoding":
            raise ProtocolError("chunked response")  # the servers under test all send lengths
    if length < 0:
        raise ProtocolError("no content-length")
    return status, length, close


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.path: str = args.path
        self.vary: bool = args.vary
        self.expect: int = args.status
        self.requests: int = args.requests
        self.stats = Stats()
        self.counter = 0
        self.stopping = False
        self.done = asyncio.get_running_loop().create_future()
        self.conns: set[Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    def request(self) -> bytes:
        path = self.path
        if self.vary:
            self.counter += 1
            path = f"{path}{self.counter}"
        return f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode()

    def record(self, status: int, latency: float) -> None:
        if self.stopping:
            return
        self.stats.statuses[status] += 1
        if status != self.expect:
            self.stats.errors[f"status {status}"] += 1
        self.stats.latencies.append(latency)
        if self.requests and len(self.stats.latencies) >= self.requests:
            self.stop()

    def error(self, kind: str) -> None:
        if not self.stopping:
            self.stats.errors[kind] += 1

    def stop(self) -> None:
        self.stopping = True
        if not self.done.done():
            self.done.set_result(None)


class Conn(asyncio.Protocol):
    """One keep-alive connection issuing requests back to back."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.remaining = -1  # body bytes still expected; -1 while reading the head
        self.status = 0
        self.close_after = False
        self.started = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.gen.conns.add(self)
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.gen.stopping:
            self.transport.close()
            return
        self.head.clear()
        self.remaining = -1
        self.busy = True
        self.started = time.perf_counter()
        self.transport.write(self.gen.request())

    def data_received(self, data: bytes) -> None:
        self.gen.stats.bytes += len(data)
        if self.remaining < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.fail("head too long")
                return
            try:
                self.status, length, self.close_after = parse_head(bytes(self.head[:end]))
            except (ProtocolError, ValueError) as exc:
                self.fail(f"protocol: {exc}")
                return
            self.remaining = length - (len(self.head) - end - 4)
            self.head.clear()
        else:
            self.remaining -= len(data)
        if self.remaining == 0:
            self.busy = False
            self.gen.record(self.status, time.perf_counter() - self.started)
            if self.close_after and self.transport is not None:
                self.transport.close()
            else:
                self.send()
        elif self.remaining < 0:
            self.fail("more bytes than content-length")

    def fail(self, kind: str) -> None:
        self.gen.error(kind)
        self.busy = False
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.conns.discard(self)
        if self.busy:
            self.gen.error("connection closed mid-response")
        if not self.gen.stopping:
            self.gen.spawn(connect(self.gen))


async def connect(gen: Generator) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_connection(lambda: Conn(gen), gen.host, gen.port)
    except OSError as exc:
        gen.error(f"connect: {type(exc).__name__}")
        await asyncio.sleep(0.05)  # no tight reconnect loop against a dead server
        if not gen.stopping:
            gen.spawn(connect(gen))


async def run_fast(args: argparse.Namespace) -> dict[str, object]:
    gen = Generator(args)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    timer = loop.call_later(args.duration, gen.stop)
    for _ in range(args.connections):
        gen.spawn(connect(gen))
    await gen.done
    elapsed = time.perf_counter() - start
    timer.cancel()
    for conn in list(gen.conns):
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0.01)  # let the closes go out before the loop ends
    return gen.stats.report(elapsed)


async def slow_client(gen: Generator, args: argparse.Namespace, delay: float) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    while not gen.stopping:
        sock = socket.socket()
        # A small receive buffer, so the kernel cannot absorb the object for the slow reader.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.slow_read)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (gen.host, gen.port)), args.timeout)
            while not gen.stopping:
                if not await slow_exchange(gen, args, sock):
                    break
        except (OSError, TimeoutError, ProtocolError, ValueError) as exc:
            gen.error(f"slow: {type(exc).__name__}")
            await asyncio.sleep(args.slow_interval)
        finally:
            sock.close()


async def slow_exchange(gen: Generator, args: argparse.Namespace, sock: socket.socket) -> bool:
    """One request read slowly; False when the connection is not reusable."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    await loop.sock_sendall(sock, gen.request())
    buf = bytearray()
    remaining = -1
    status = 0
    close = False
    while remaining != 0:
        data = await asyncio.wait_for(loop.sock_recv(sock, args.slow_read), args.timeout)
        if gen.stopping:
            return False
        if not data:
            raise ProtocolError("closed mid-response")
        gen.stats.bytes += len(data)
        if remaining < 0:
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("head too long")
                continue
            status, length, close = parse_head(bytes(buf[:end]))
            remaining = length - (len(buf) - end - 4)
        else:
            remaining -= len(data)
        if remaining < 0:
            raise ProtocolError("more bytes than content-length")
        if remaining:
            await asyncio.sleep(args.slow_interval)
    gen.record(status, time.perf_counter() - started)
    return not close


async def run_slow(args: argparse.Namespace) -> dict[str, object]:
    gen = Generator(args)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    timer = loop.call_later(args.duration, gen.stop)
    # Spread the connects, so the test is about slow readers rather than a SYN burst.
    spread = min(1.0, args.duration / 4)
    tasks = [
        asyncio.ensure_future(slow_client(gen, args, spread * i / args.connections))
        for i in range(args.connections)
    ]
    await gen.done
    elapsed = time.perf_counter() - start
    timer.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return gen.stats.report(elapsed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--vary", action="store_true", help="append a counter to the path")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (an upper bound)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: none)")
    parser.add_argument("--status", type=int, default=200, help="the expected status")
    parser.add_argument("--slow-read", type=int, default=0, help="bytes per read (slow clients)")
    parser.add_argument("--slow-interval", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=30.0, help="per read/connect, seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = aio.run(run_slow(args) if args.slow_read else run_fast(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

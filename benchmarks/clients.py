"""`python -m benchmarks clients`: what the upstream HTTP client alone costs, per request.

No proxy and no load generator: this process is the client, pinned to the first CPU, fetching
from the origin (nginx or the built-in one, on the second CPU) with 64 requests in flight. Its
own CPU time (user + system) per request is the client's cost. Contenders, interleaved per round:

- `proxy-upstream`: the proxy's `upstream.HttpOrigin` (one pooled aiohttp session, as configured
  for production), open -> read every chunk -> close, exactly as the handler does;
- `aiohttp`: a plain shared `aiohttp.ClientSession` with default settings;
- `httpx`: a shared pooled `httpx.AsyncClient`, when httpx is importable (not a dependency);
- `floor`: 64 keep-alive connections speaking HTTP/1.1 through `httptools` with nothing else (no
  pool bookkeeping, timeouts or error mapping): the least a Python client on this loop can cost.

Every response's length is checked; the JSON goes to `results/clients/`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httptools

from . import aio, contenders, nginx, report
from .objects import MIB, Obj, make_object
from .procs import REPO, cpu_count, stop_all

Fetch = Callable[[str], Awaitable[int]]  # path -> body bytes received
CONCURRENCY = 64
Opened = tuple[Fetch, Callable[[], Awaitable[None]]]  # fetch, close
Maker = Callable[[str], Awaitable[Opened]]  # base URL -> an opened client
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "clients"


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; body bytes counted, not kept."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.waiter: asyncio.Future[int] | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set_result(self.received)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("origin closed the connection"))

    def get(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.received = 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter


async def _floor(base: str) -> Opened:
    host, port = base.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    for _ in range(CONCURRENCY):
        _, conn = await loop.create_connection(_Conn, host, int(port))
        idle.append(conn)

    async def fetch(path: str) -> int:
        conn = idle.pop()  # never empty: at most CONCURRENCY fetches run at once
        try:
            return await conn.get(
                b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())
            )
        finally:
            idle.append(conn)

    async def close() -> None:
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()

    return fetch, close


async def _aiohttp(base: str) -> Opened:
    session = aiohttp.ClientSession(auto_decompress=False)

    async def fetch(path: str) -> int:
        async with session.get(base + path) as resp:
            n = 0
            async for chunk in resp.content.iter_any():
                n += len(chunk)
            return n

    return fetch, session.close


async def _proxy_upstream(base: str) -> Opened:
    from proxy_service.config import Config
    from proxy_service.storage import Entry
    from proxy_service.upstream import HttpOrigin

    origin = HttpOrigin(Config.load({}))
    await origin.start()

    async def fetch(path: str) -> int:
        url = base + path
        resp = await origin.open(Entry(path, url, url, math.inf, 0.0), "GET", {})
        n = 0
        try:
            while chunk := await resp.read():
                n += len(chunk)
        finally:
            resp.close()
        return n

    return fetch, origin.aclose


async def _httpx(base: str) -> Opened:
    httpx = importlib.import_module("httpx")  # optional: not a dependency

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY))

    async def fetch(path: str) -> int:
        async with client.stream("GET", base + path) as resp:
            n = 0
            async for chunk in resp.aiter_raw():
                n += len(chunk)
            return n

    return fetch, client.aclose


def available_clients() -> dict[str, Maker]:
    clients: dict[str, Maker] = {
        "proxy-upstream": _proxy_upstream,
        "aiohttp": _aiohttp,
        "floor": _floor,
    }
    if importlib.util.find_spec("httpx") is not None:
        clients["httpx"] = _httpx
    return clients


async def _measure(fetch: Fetch, path: str, size: int, requests: int) -> dict[str, float]:
    per_worker = max(1, requests // CONCURRENCY)

    async def worker() -> None:
        for _ in range(per_worker):
            got = await fetch(path)
            if got != size:
                raise RuntimeError(f"{path}: {got} bytes, expected {size}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_worker * CONCURRENCY
    return {"cpu_us_per_req": cpu / done * 1e6, "req_s": done / wall}


async def compare(
    base: str, objects: list[tuple[Obj, int]], rounds: int, names: list[str]
) -> dict[str, dict[str, dict[str, float]]]:
    makers = available_clients()
    opened = {name: await makers[name](base) for name in names if name in makers}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for obj, requests in objects:  # warm-up: connections open, caches hot
            for fetch, _ in opened.values():
                await _measure(fetch, f"/{obj.name}", obj.size, min(requests, 4 * CONCURRENCY))
        for _ in range(rounds):
            for obj, requests in objects:
                for name, (fetch, _) in opened.items():
                    cell = samples.setdefault(obj.name, {}).setdefault(name, [])
                    cell.append(await _measure(fetch, f"/{obj.name}", obj.size, requests))
    finally:
        for _, close in opened.values():
            await close()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for obj, _ in objects:
        row = results[obj.name] = {}
        for name, runs in samples[obj.name].items():
            cpu = statistics.median(r["cpu_us_per_req"] for r in runs)
            req_s = statistics.median(r["req_s"] for r in runs)
            row[name] = {"cpu_us_per_req": cpu, "req_s": req_s, "mib_s": req_s * obj.size / MIB}
        floor = row.get("floor")
        for entry in row.values():
            entry["cpu_x_floor"] = entry["cpu_us_per_req"] / floor["cpu_us_per_req"] if floor else 0
    return results


def run(
    smoke: bool, rounds: int, results_dir: Path, origin_kind: str, names: list[str]
) -> dict[str, Any]:
    pin = cpu_count() >= 2
    with tempfile.TemporaryDirectory(prefix="clients-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "objects"
        root.mkdir()
        small = make_object(root, "small.bin", 16 * 1024)
        large = make_object(root, "large.bin", 4 * MIB)
        nginx_bin = nginx.find_nginx() if origin_kind != "builtin" else None
        try:
            origin = contenders.start_origin(nginx_bin, tmp, root, small, {1} if pin else None)
            if pin:
                os.sched_setaffinity(0, {0})
            plan = [(small, 256 if smoke else 20_000), (large, 64 if smoke else 640)]
            results = aio.run(compare(origin.base_url, plan, 1 if smoke else rounds, names))
        finally:
            stop_all()
    data = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "origin": origin.kind,
        "pinned": pin,
        "concurrency": CONCURRENCY,
        "rounds": 1 if smoke else rounds,
        "results": results,
    }
    report.write_json(data, results_dir)
    return data


def table(data: dict[str, Any]) -> str:
    lines = [
        f"{'object':10} {'client':15} {'CPU us/req':>10} {'x floor':>8} {'req/s':>8} {'MiB/s':>8}"
    ]
    for obj, row in data["results"].items():
        for name, e in row.items():
            lines.append(
                f"{obj:10} {name:15} {e['cpu_us_per_req']:10.0f} {e['cpu_x_floor']:8.1f} "
                f"{e['req_s']:8.0f} {e['mib_s']:8.1f}"
            )
    return "\n".join(lines)

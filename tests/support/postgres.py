"""The machine's PostgreSQL (127.0.0.1:5432, trust auth) for tests: a schema of a test module's own,
and a TCP forwarder in front of the server that a test can cut, stall and restore, since the
shared server itself must never be stopped."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import pytest

HOST = "127.0.0.1"
PORT = 5432
DATABASE = "test"
ADMIN_DSN = f"postgresql://postgres@{HOST}:{PORT}/{DATABASE}"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _connect(schema: str = "") -> asyncpg.Connection[asyncpg.Record]:
    try:
        settings = {"search_path": schema} if schema else None
        return await asyncpg.connect(ADMIN_DSN, server_settings=settings, timeout=5)
    except OSError as exc:
        pytest.fail(f"no PostgreSQL at {HOST}:{PORT} ({type(exc).__name__})")


class Schema:
    """A schema of its own (`proxy_test_<hex>`) in the `test` database, dropped at the end."""

    def __init__(self) -> None:
        self.name = f"proxy_test_{uuid.uuid4().hex[:12]}"

    def create(self) -> Schema:
        self.execute(f"CREATE SCHEMA {self.name}", schema=False)
        return self

    def drop(self) -> None:
        self.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE", schema=False)

    def execute(self, sql: str, *args: object, schema: bool = True) -> str:
        async def go() -> str:
            conn = await _connect(self.name if schema else "")
            try:
                return await conn.execute(sql, *args)
            finally:
                await conn.close()

        return run(go())

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        async def go() -> None:
            conn = await _connect(self.name)
            try:
                await conn.executemany(sql, rows)
            finally:
                await conn.close()

        run(go())

    def fetchval(self, sql: str, *args: object) -> object:
        async def go() -> object:
            conn = await _connect(self.name)
            try:
                return await conn.fetchval(sql, *args)
            finally:
                await conn.close()

        return run(go())


def backends(application_name: str) -> int:
    """Server processes connected under this application name (pg_stat_activity)."""

    async def go() -> int:
        conn = await _connect()
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
            assert isinstance(count, int)
            return count
        finally:
            await conn.close()

    return run(go())


class Forwarder:
    """127.0.0.1:<port> -> the PostgreSQL server, from a thread running its own loop.

    `cut()`: refuse new connections and drop the open ones (the server is gone); `stall()`:
    accept, but relay no byte either way (the server hangs); `restore()`: back to normal.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.accepted = 0

    def dsn(self, schema: str, application_name: str) -> str:
        return (
            f"postgresql://postgres@{HOST}:{self.port}/{DATABASE}"
            f"?search_path={schema}&application_name={application_name}"
        )

    def start(self) -> Forwarder:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def stall(self) -> None:
        self._call(self._set_flowing(False))

    def restore(self) -> None:
        self._call(self._restore())

    def close(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(10)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(self._accept, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()  # a stalled pump waits on `_flowing`, not on its socket
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    async def _restore(self) -> None:
        await self._set_flowing(True)
        if self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        self._open.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        except OSError:
            self._open.discard(writer)
            writer.transport.abort()
            return
        self._open.add(up_writer)
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            self._open.discard(w)
            w.transport.abort()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            return

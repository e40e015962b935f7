"""The `sql` resolver: image id -> object key, looked up in the application's PostgreSQL.

    PROXY_SQL_QUERY = SELECT cos_key FROM images WHERE id = $1 AND deleted_at IS NULL

The id is only ever a bind parameter. The query is prepared and checked at start-up (one `$1`
of a text or uuid type; a text key column, optionally a text content-type column). Every lookup
(pool wait, connect, statement) is bounded by `sql_timeout`; a database that is down, slow or out
of connections is `ResolverUnavailable` (503), never `NotFound`, which CDNs would keep.

Imported only when `PROXY_RESOLVER=sql` (by `resolvers.make_resolver`): asyncpg is optional.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from .config import Config, ConfigError
from .errors import NotFound, ResolverUnavailable

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - Config.validate refuses this first
    raise ImportError(
        "PROXY_RESOLVER=sql needs asyncpg: pip install 'proxy-service[postgres]'"
    ) from exc

log = logging.getLogger("proxy_service.sql")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

_TEXT = frozenset({"text", "varchar", "bpchar", "name"})
_ID = _TEXT | {"uuid"}
# The server is there but cannot serve us now, as opposed to refusing our settings.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up, query cancelled
    asyncpg.InsufficientResourcesError,  # too many connections
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_FAILURES = (*_TRANSIENT, asyncpg.PostgresError, ConfigError)


class SqlResolver:
    def __init__(self, config: Config) -> None:
        self._dsn = config.sql_dsn
        self._query = config.sql_query
        self._min = config.sql_pool_min
        self._max = config.sql_pool_size
        self._timeout = config.sql_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._checked = False  # the query passed `_check` on this database
        self._lock = asyncio.Lock()
        self._up: bool | None = None  # for logging state changes only
        self.queries = 0  # lookups sent to the database

    async def start(self) -> None:
        """Connect and check the query. Wrong settings raise `ConfigError`; an unreachable
        database only degrades (misses answer 503 until it is back, cached ids keep working)."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._ready()
        except ConfigError as exc:
            log.error("%s", exc)
            await self.aclose()
            raise
        except _TRANSIENT as exc:
            self._state(False, type(exc).__name__)
            return
        self._state(True, "")

    async def resolve(self, image_id: str) -> str:
        async def lookup(conn: Conn) -> asyncpg.Record | None:
            self.queries += 1
            return await conn.fetchrow(self._query, image_id)

        try:
            row = await self._run(lookup)
        except asyncpg.DataError:
            # The id is no valid input for the id column (not a UUID, say): no such image.
            self._state(True, "")
            raise NotFound() from None
        except _FAILURES as exc:
            why = str(exc) if isinstance(exc, ConfigError) else type(exc).__name__
            self._state(False, why)
            raise ResolverUnavailable(type(exc).__name__) from None
        self._state(True, "")
        key = None if row is None else row[0]
        if not key:
            raise NotFound()
        assert isinstance(key, str)  # `_check` made sure the column is text
        return key

    async def ping(self) -> bool:
        """For readiness: does the database answer within the timeout?"""
        try:
            await self._run(lambda conn: conn.fetchval("SELECT 1"))
        except _FAILURES as exc:
            self._state(False, type(exc).__name__)
            return False
        self._state(True, "")
        return True

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except TimeoutError:
            pool.terminate()

    async def _run(self, use: Callable[[Conn], Awaitable[T]]) -> T:
        """`use` on a pooled connection, the whole of it (pool wait included) within the timeout."""
        async with asyncio.timeout(self._timeout):
            return await self._use(await self._ready(), use)

    async def _use(
        self, pool: asyncpg.Pool[asyncpg.Record], use: Callable[[Conn], Awaitable[T]]
    ) -> T:
        # With a timeout, the release (a reset round trip) is bounded too.
        conn = await pool.acquire(timeout=self._timeout)
        try:
            result = await use(conn)
        except (asyncpg.PostgresError, ConfigError):
            await pool.release(conn)  # the server answered: the connection is in sync
            raise
        except BaseException:
            # Timed out, cancelled or broken mid-statement: close it rather than wait for a
            # cancellation round trip; the pool opens a new one when needed.
            conn.terminate()
            raise
        await pool.release(conn)
        return result

    async def _ready(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is not None and self._checked:
            return self._pool
        async with self._lock:
            if self._pool is None:
                self._pool = await self._connect()
            if not self._checked:
                await self._use(self._pool, self._check)
                self._checked = True
            return self._pool

    async def _connect(self) -> asyncpg.Pool[asyncpg.Record]:
        pool = asyncpg.create_pool(
            self._dsn,
            min_size=self._min,
            max_size=self._max,
            timeout=self._timeout,  # connect
            # The server's own bound, should a cancelled statement keep running there.
            server_settings={"statement_timeout": str(max(1, int(self._timeout * 1000)))},
        )
        try:
            await pool
        except BaseException as exc:
            pool.terminate()
            if isinstance(
                exc,
                asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidCatalogNameError,
            ):
                # The server's message names the user or database, never the password.
                raise ConfigError(f"PROXY_SQL_DSN: the database refused it: {exc}") from None
            if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
                raise ConfigError("PROXY_SQL_DSN: not a valid PostgreSQL DSN") from None
            raise
        return pool

    async def _check(self, conn: Conn) -> None:
        def bad(why: str) -> ConfigError:
            return ConfigError(f"PROXY_SQL_QUERY: {why}")

        try:
            stmt = await conn.prepare(self._query)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _TRANSIENT):
                raise
            raise bad(f"the database refused it: {exc}") from None
        params = stmt.get_parameters()
        if len(params) != 1:
            raise bad(f"must take exactly one parameter ($1, the image id), not {len(params)}")
        if params[0].name not in _ID:
            raise bad(
                f"$1 is compared as {params[0].name}; it must be text or uuid "
                "(cast it in SQL, e.g. id = $1::text::bigint)"
            )
        columns = stmt.get_attributes()
        if not 1 <= len(columns) <= 2:
            raise bad(
                "must return the object key and optionally a content type, "
                f"not {len(columns)} columns"
            )
        for n, column in enumerate(columns, 1):
            if column.type.name not in _TEXT:
                raise bad(f"column {n} ({column.name}) is {column.type.name}; it must be text")

    def _state(self, up: bool, why: str) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            log.info("database resolver available")
        else:
            log.warning("database resolver unavailable: %s", why)

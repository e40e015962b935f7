"""The `sql` resolver against the machine's PostgreSQL, through a forwarder the tests can cut and
stall: hits and misses (negatively cached), soft deletes, outages (cached ids served, misses 503,
readiness degraded, recovery), pool exhaustion, query checks at start-up, SQL injection through
the id, and the refresher retiring a deleted row's entry."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from proxy_service.config import Config, ConfigError
from proxy_service.errors import NotFound, ResolverUnavailable
from proxy_service.index import Index
from proxy_service.refresher import Refresher
from proxy_service.resolvers import make_resolver
from proxy_service.sql import SqlResolver
from proxy_service.store import Keys
from tests.conftest import REDIS_URL, ConfigFactory
from tests.support.cos_server import CosTestServer, pattern
from tests.support.http import Reply, raw_request, request
from tests.support.postgres import Forwarder, Schema, backends
from tests.support.proxy import ProxyProcess, ThreadedProxy, running
from tests.support.scrape import delta, scrape

QUERY = "SELECT cos_key FROM images WHERE id = $1 AND deleted_at IS NULL"
BODY = pattern(0, 20_000)


# -- parts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> Iterator[Schema]:
    db = Schema().create()
    try:
        db.execute(
            """
            CREATE TABLE images (
                id uuid PRIMARY KEY,
                cos_key text NOT NULL,
                content_type text,
                width int,
                deleted_at timestamptz
            );
            CREATE TABLE named_images (name text PRIMARY KEY, cos_key text NOT NULL);
            -- A lookup that takes 100 ms: a slow database, for the pool-exhaustion burst.
            CREATE FUNCTION slow_key(p uuid) RETURNS text LANGUAGE sql AS $$
                SELECT pg_sleep(0.1);
                SELECT cos_key FROM images WHERE id = p AND deleted_at IS NULL;
            $$;
            """
        )
        yield db
    finally:
        db.drop()


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    with Forwarder() as fwd:
        yield fwd


@pytest.fixture
def app_name() -> str:
    """An application_name of this test's own, to find its connections in pg_stat_activity."""
    return f"proxy-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sql_config(
    cos_config: ConfigFactory, schema: Schema, forwarder: Forwarder, app_name: str
) -> ConfigFactory:
    def make(**changes: Any) -> Config:
        base: dict[str, Any] = {
            "resolver": "sql",
            "sql_dsn": forwarder.dsn(schema.name, app_name),
            "sql_query": QUERY,
            "sql_pool_min": 1,
            "sql_pool_size": 4,
            "sql_timeout": 0.5,
        }
        base.update(changes)
        return cos_config(**base)

    return make


def add_image(db: Schema, cos: CosTestServer | None = None, key: str = "") -> tuple[str, str]:
    """A row (and, with `cos`, its object) under an underivable key: (id, key)."""
    image_id = str(uuid.uuid4())
    key = key or f"images/user{uuid.uuid4().hex[:6]}/{image_id}.png"
    db.execute("INSERT INTO images (id, cos_key) VALUES ($1, $2)", uuid.UUID(image_id), key)
    if cos is not None:
        cos.put(key, BODY)
    return image_id, key


def get(proxy: ThreadedProxy, image_id: str) -> Reply:
    return request(f"{proxy.base_url}/images/{image_id}", timeout=10)


def readiness(proxy: ThreadedProxy) -> tuple[int, dict[str, Any]]:
    reply = request(proxy.internal_url + "/readyz")
    body: dict[str, Any] = json.loads(reply.body)
    return reply.status, body


def resolver_of(proxy: ThreadedProxy) -> SqlResolver:
    resolver = proxy.app.resolver
    assert isinstance(resolver, SqlResolver)
    return resolver


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 503
    assert reply.header("retry-after") == "5"
    assert reply.header("cache-control") == "no-store"
    assert reply.body == b"temporarily unavailable\n"


# -- hits, misses, deletes --------------------------------------------------------------------


def test_hit_miss_and_negative_cache_never_query_twice(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema, forwarder: Forwarder
) -> None:
    image_id, key = add_image(schema, cos)
    unknown = str(uuid.uuid4())
    with running(sql_config()) as proxy:
        resolver = resolver_of(proxy)
        reply = get(proxy, image_id)
        assert reply.status == 200
        assert reply.body == BODY
        assert [r.path for r in cos.requests] == ["/" + key]
        assert resolver.queries == 1

        for _ in range(2):
            missing = get(proxy, unknown)
            assert missing.status == 404
            assert missing.header("cache-control") == "public, max-age=60"
        # Not a UUID: the database cannot even parse it. A 404 (cached), not a 5xx.
        for _ in range(2):
            assert get(proxy, "not-a-uuid.png").status == 404
        assert get(proxy, image_id).status == 200
        assert resolver.queries == 3  # one per id: hits and negative hits never query

        # With the database gone, everything cached is answered exactly as before.
        forwarder.cut()
        assert get(proxy, image_id).body == BODY
        assert get(proxy, unknown).status == 404
        assert get(proxy, "not-a-uuid.png").status == 404
        assert resolver.queries == 3


def test_keys_from_the_database_must_stay_under_the_prefix(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema
) -> None:
    outside, _ = add_image(schema, key="private/secrets.txt")
    traversal, _ = add_image(schema, key="images/../private/secrets.txt")
    with running(sql_config()) as proxy:
        assert get(proxy, outside).status == 400
        assert get(proxy, traversal).status == 400
    assert cos.requests == []


def test_soft_deleted_row_is_404_once_the_entry_is_purged(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema, redis_prefix: str
) -> None:
    image_id, _ = add_image(schema, cos)
    config = sql_config(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    with running(config) as proxy:
        assert get(proxy, image_id).status == 200
        schema.execute("UPDATE images SET deleted_at = now() WHERE id = $1", uuid.UUID(image_id))
        # Cached with its key: served until purged (or expired), without asking the database.
        assert get(proxy, image_id).status == 200
        assert resolver_of(proxy).queries == 1

        async def purge() -> None:
            index = Index(config)
            try:
                await index.purge(image_id)
            finally:
                await index.aclose()

        asyncio.run(purge())
        deadline = time.monotonic() + 5
        while (reply := get(proxy, image_id)).status == 200:
            assert time.monotonic() < deadline, "the purge never reached the proxy"
            time.sleep(0.02)
        assert reply.status == 404
        assert resolver_of(proxy).queries == 2


# -- outages ----------------------------------------------------------------------------------


def test_database_outage_serves_cached_ids_and_503s_misses(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema, forwarder: Forwarder
) -> None:
    cached, _ = add_image(schema, cos)
    later, _ = add_image(schema, cos)
    slow, _ = add_image(schema, cos)
    with running(sql_config()) as proxy:
        assert get(proxy, cached).status == 200
        assert readiness(proxy) == (
            200,
            {"status": "ready", "redis": "off", "storage": "cos", "resolver": "up"},
        )

        before = scrape(proxy.internal_url)
        forwarder.cut()  # the server is gone: connections dropped, new ones refused
        assert get(proxy, cached).body == BODY
        for _ in range(2):  # ... and not negatively cached: still a 503, never a 404
            assert_unavailable(get(proxy, later))
        assert readiness(proxy) == (
            200,  # still ready: cached ids are served, and every pod sees the same database
            {"status": "degraded", "redis": "off", "storage": "cos", "resolver": "down"},
        )
        after = scrape(proxy.internal_url)
        assert delta(before, after, "proxy_errors_total", label="resolver_unavailable") == 2

        forwarder.restore()
        assert get(proxy, later).body == BODY
        assert readiness(proxy)[1]["resolver"] == "up"

        forwarder.stall()  # the server hangs: connections accepted, nothing answered
        started = time.monotonic()
        assert_unavailable(get(proxy, slow))
        assert time.monotonic() - started < 0.5 + 0.5  # the timeout, not the server, decides
        assert get(proxy, cached).status == 200
        forwarder.restore()
        assert get(proxy, slow).body == BODY


def test_starts_with_the_database_down_and_recovers(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema, forwarder: Forwarder
) -> None:
    image_id, _ = add_image(schema, cos)
    forwarder.cut()
    with running(sql_config()) as proxy:  # an outage is not a configuration error
        assert_unavailable(get(proxy, image_id))
        assert readiness(proxy)[1]["resolver"] == "down"
        forwarder.restore()
        # The query is checked on the first connection, then the miss is answered.
        assert get(proxy, image_id).body == BODY
        assert readiness(proxy)[1] == {
            "status": "ready",
            "redis": "off",
            "storage": "cos",
            "resolver": "up",
        }


def test_pool_exhaustion_is_bounded_503s_and_leaks_nothing(
    cos: CosTestServer, sql_config: ConfigFactory, schema: Schema, app_name: str
) -> None:
    key = "images/burst/shared.png"
    cos.put(key, BODY)
    ids = [str(uuid.uuid4()) for _ in range(200)]
    schema.executemany(
        "INSERT INTO images (id, cos_key) VALUES ($1, $2)", [(uuid.UUID(i), key) for i in ids]
    )
    config = sql_config(sql_query="SELECT slow_key($1)", sql_pool_size=4, sql_timeout=0.5)
    with running(config) as proxy:
        started = time.monotonic()
        with ThreadPoolExecutor(200) as pool:
            replies = list(pool.map(lambda i: get(proxy, i), ids))
        elapsed = time.monotonic() - started
        statuses = Counter(r.status for r in replies)
        assert set(statuses) == {200, 503}, statuses  # enough connections for some, no queue
        assert statuses[200] >= 4
        for reply in replies:
            if reply.status == 503:
                assert_unavailable(reply)
        assert elapsed < 5, elapsed  # every wait was bounded by the timeout

        deadline = time.monotonic() + 5
        while (count := backends(app_name)) > 4:
            assert time.monotonic() < deadline, f"{count} connections for a pool of 4"
            time.sleep(0.05)
        # The pool still works: a refused id is served now.
        refused = next(i for i, r in zip(ids, replies, strict=True) if r.status == 503)
        assert get(proxy, refused).body == BODY
    deadline = time.monotonic() + 5
    while backends(app_name):  # closed with the proxy
        assert time.monotonic() < deadline, "connections left after shutdown"
        time.sleep(0.05)


# -- the query, checked at start-up -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT width FROM images WHERE id = $1", "column 1 (width) is int4"),
        ("SELECT cos_key FROM images WHERE id = $1 AND width = $2", "exactly one parameter"),
        ("SELECT cos_key FROM images", "exactly one parameter"),
        ("SELECT cos_key FROM images WHERE width = $1", "$1 is compared as int4"),
        ("SELECT cos_key, width FROM images WHERE id = $1", "column 2 (width) is int4"),
        ("SELECT cos_key, content_type, id FROM images WHERE id = $1", "not 3 columns"),
        ("SELECT cos_key FROM imagez WHERE id = $1", 'relation "imagez" does not exist'),
        ("SELEC cos_key FROM images WHERE id = $1", "syntax error"),
    ],
)
def test_a_wrong_query_is_refused_at_start_up(
    sql_config: ConfigFactory, app_name: str, query: str, why: str
) -> None:
    resolver = SqlResolver(sql_config(sql_query=query))
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_QUERY: ") as exc:
        asyncio.run(resolver.start())
    assert why in str(exc.value)
    assert backends(app_name) == 0  # and its pool is closed


def test_good_queries_pass_the_check(sql_config: ConfigFactory, schema: Schema) -> None:
    image_id, key = add_image(schema)
    for query in (
        QUERY,
        "SELECT cos_key, content_type FROM images WHERE id = $1",
        "SELECT cos_key FROM images WHERE id::text = $1",
        "SELECT cos_key::varchar FROM images WHERE id = $1::text::uuid",
    ):
        resolver = SqlResolver(sql_config(sql_query=query))

        async def main(resolver: SqlResolver = resolver) -> str:
            try:
                await resolver.start()
                return await resolver.resolve(image_id)
            finally:
                await resolver.aclose()

        assert asyncio.run(main()) == key


def test_the_service_does_not_start_with_a_wrong_query(
    cos: CosTestServer, sql_config: ConfigFactory
) -> None:
    config = sql_config(sql_query="SELECT width FROM images WHERE id = $1")
    env = {k: v for k, v in config.to_env().items() if k not in ("PROXY_PORT",)}
    proxy = ProxyProcess({**env, "PROXY_INTERNAL_PORT": "0"})
    with pytest.raises(RuntimeError, match="proxy exited") as exc:
        proxy.start()
    assert proxy.proc is not None
    assert proxy.proc.returncode == 2  # a configuration error, as for any other setting
    assert "PROXY_SQL_QUERY: column 1 (width) is int4" in str(exc.value)
    assert config.sql_dsn not in str(exc.value)


def test_a_refused_dsn_is_a_configuration_error_without_the_password(
    sql_config: ConfigFactory,
) -> None:
    dsn = "postgresql://postgres:hunter2pass@127.0.0.1:5432/no_such_database_here"
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_DSN: ") as exc:
        asyncio.run(SqlResolver(sql_config(sql_dsn=dsn)).start())
    assert "hunter2pass" not in str(exc.value)


# -- SQL injection through the id -------------------------------------------------------------

HOSTILE = [
    "1' OR '1'='1",
    "x; DROP TABLE images",
    "x'; DROP TABLE images; --",
    "' UNION SELECT cos_key FROM images --",
    "$1",
    "%s",
    "\\",
    "a\x00b",
    "00000000-0000-0000-0000-000000000000' OR 'x'='x",
]


@pytest.mark.parametrize(
    "path",
    [b"/images/1'%20OR%20'1'='1", b"/images/x;%20DROP%20TABLE%20images", b"/images/x'--"],
)
def test_hostile_ids_are_400_before_the_database(
    cos: CosTestServer, sql_config: ConfigFactory, path: bytes
) -> None:
    with running(sql_config()) as proxy:
        reply = raw_request(
            "127.0.0.1", proxy.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert resolver_of(proxy).queries == 0


def test_hostile_ids_are_inert_bind_parameters(sql_config: ConfigFactory, schema: Schema) -> None:
    image_id, key = add_image(schema)
    literal = "1' OR '1'='1"
    schema.execute(
        "INSERT INTO named_images VALUES ($1, 'images/literal.png') ON CONFLICT DO NOTHING",
        literal,
    )
    rows = schema.fetchval("SELECT count(*) FROM images")
    by_uuid = SqlResolver(sql_config())
    by_name = SqlResolver(sql_config(sql_query="SELECT cos_key FROM named_images WHERE name = $1"))

    async def main() -> None:
        try:
            for resolver in (by_uuid, by_name):
                await resolver.start()
                for hostile in HOSTILE:
                    if resolver is by_name and hostile == literal:
                        continue  # that one is a row of its own, below
                    with pytest.raises(NotFound):
                        await resolver.resolve(hostile)
                    with pytest.raises(NotFound):
                        await resolver.resolve(image_id + hostile)
            assert await by_uuid.resolve(image_id) == key
            # The string reaches the database as a value, byte for byte: it matches its row.
            assert await by_name.resolve(literal) == "images/literal.png"
        finally:
            await by_uuid.aclose()
            await by_name.aclose()

    asyncio.run(main())
    assert schema.fetchval("SELECT count(*) FROM images") == rows
    assert schema.fetchval("SELECT to_regclass('images') IS NOT NULL") is True


# -- the refresher ----------------------------------------------------------------------------


def test_refresher_retires_deleted_rows_and_retries_after_database_errors(
    cos: CosTestServer,
    sql_config: ConfigFactory,
    schema: Schema,
    forwarder: Forwarder,
    redis_prefix: str,
) -> None:
    kept, _ = add_image(schema, cos)
    deleted, _ = add_image(schema, cos)
    config = sql_config(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        redis_timeout=2.0,
        refresh_lease=1.0,
        refresh_heartbeat_file="",
    )
    with running(config) as proxy:  # a proxy signs both and enters them in the index
        assert get(proxy, kept).status == 200
        assert get(proxy, deleted).status == 200
    schema.execute("UPDATE images SET deleted_at = now() WHERE id = $1", uuid.UUID(deleted))
    keys = Keys(redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)

    def stored(name: str) -> bool:
        return bool(client.exists(name))

    def due(image_id: str) -> float | None:
        return client.zscore(keys.due, image_id)

    async def main() -> None:
        index = Index(config)
        worker = Refresher(config, index)  # its own resolver: make_resolver(config), SQL
        assert isinstance(worker.resolver, SqlResolver)
        try:
            await index.release([kept, deleted], time.time())  # due now
            stats = await worker.cycle()
            assert (stats.claimed, stats.refreshed, stats.retired, stats.failed) == (2, 1, 1, 0)
            assert (stored(keys.url(deleted)), due(deleted)) == (False, None)
            assert stored(keys.url(kept))

            forwarder.cut()
            await index.release([kept], time.time())
            stats = await worker.cycle()
            assert (stats.claimed, stats.refreshed, stats.failed) == (1, 0, 1)
            assert due(kept) is not None  # leased, not lost

            forwarder.restore()
            await asyncio.sleep(config.refresh_lease + 0.05)
            stats = await worker.cycle()
            assert (stats.claimed, stats.refreshed, stats.failed) == (1, 1, 0)
        finally:
            await worker.resolver.aclose()
            await index.aclose()

    try:
        asyncio.run(main())
    finally:
        client.close()


# -- configuration and the optional dependency ------------------------------------------------


def test_sql_settings_are_checked_and_the_dsn_is_a_secret() -> None:
    base = {"PROXY_RESOLVER": "sql", "PROXY_SQL_QUERY": QUERY}
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_DSN: is required"):
        Config.load(base)
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_DSN: must be a postgresql"):
        Config.load({**base, "PROXY_SQL_DSN": "mysql://db/app"})
    dsn = "postgresql://app:hunter2pass@db:5432/app"
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_QUERY: is required"):
        Config.load({"PROXY_RESOLVER": "sql", "PROXY_SQL_DSN": dsn})
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_POOL_MIN"):
        Config.load({"PROXY_SQL_POOL_MIN": "5", "PROXY_SQL_POOL_SIZE": "4"})
    with pytest.raises(ConfigError, match=r"^PROXY_SQL_TIMEOUT"):
        Config.load({"PROXY_SQL_TIMEOUT": "0"})
    config = Config.load({**base, "PROXY_SQL_DSN": dsn})
    assert config.redacted()["sql_dsn"] == "***"
    assert "hunter2pass" not in repr(config)
    assert isinstance(make_resolver(config), SqlResolver)
    assert type(make_resolver(Config())).__name__ == "TemplateResolver"


def test_without_asyncpg_the_sql_resolver_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "proxy_service.sql")
    env = {
        "PROXY_RESOLVER": "sql",
        "PROXY_SQL_DSN": "postgresql://db/app",
        "PROXY_SQL_QUERY": QUERY,
    }
    with pytest.raises(ConfigError, match=r"^PROXY_RESOLVER: sql needs asyncpg: pip install"):
        Config.load(env)
    with pytest.raises(ImportError, match=r"proxy-service\[postgres\]"):
        import proxy_service.sql  # noqa: F401
    # The template resolver never imports it.
    assert type(make_resolver(Config())).__name__ == "TemplateResolver"


def test_a_database_error_at_run_time_is_unavailable_not_not_found(
    sql_config: ConfigFactory, schema: Schema
) -> None:
    schema.execute("CREATE TABLE scratch (id uuid PRIMARY KEY, cos_key text)")
    resolver = SqlResolver(sql_config(sql_query="SELECT cos_key FROM scratch WHERE id = $1"))

    async def main() -> None:
        try:
            await resolver.start()
            with pytest.raises(NotFound):
                await resolver.resolve(str(uuid.uuid4()))
            # A migration gone wrong: a database problem, not a missing image.
            await asyncio.to_thread(schema.execute, "DROP TABLE scratch")
            with pytest.raises(ResolverUnavailable):
                await resolver.resolve(str(uuid.uuid4()))
            assert await resolver.ping()  # the database itself is fine
        finally:
            await resolver.aclose()

    asyncio.run(main())

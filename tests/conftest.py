from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy_service.config import Config
from tests.support.cos_server import BUCKET, REGION, CosTestServer
from tests.support.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"

ConfigFactory = Callable[..., Config]


@pytest.fixture
def cos(tmp_path: Path) -> Iterator[CosTestServer]:
    with CosTestServer(tmp_path / "bucket") as server:
        yield server


@pytest.fixture
def cos_config(cos: CosTestServer) -> ConfigFactory:
    """Settings for a proxy whose COS backend is the local test origin."""

    def make(**changes: Any) -> Config:
        base: dict[str, Any] = {
            "storage": "cos",
            "cos_secret_id": cos.secret_id,
            "cos_secret_key": cos.secret_key,
            "cos_bucket": BUCKET,
            "cos_region": REGION,
            "cos_domain": cos.domain,
            "cos_scheme": "http",
            "upstream_connect_timeout": 2.0,
            "upstream_read_timeout": 5.0,
            # Off unless a test is about it: most tests watch every request reach the origin.
            "object_cache_size": 0,
        }
        base.update(changes)
        config = Config(**base)
        config.validate()
        return config

    return make


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis at 127.0.0.1:6379, cleaned after."""
    prefix = f"test:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"no Redis at {REDIS_URL}: start redis-server (.ci/run does)")
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A plain synchronous client on the shared Redis, to look at (and plant) raw bytes."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"no Redis at {REDIS_URL}: start redis-server (.ci/run does)")
    yield client
    client.close()


def cos_env(cos: CosTestServer, **extra: str) -> dict[str, str]:
    """`PROXY_*` variables for a proxy process whose COS backend is the test origin."""
    return {
        "PROXY_STORAGE": "cos",
        "PROXY_COS_SECRET_ID": cos.secret_id,
        "PROXY_COS_SECRET_KEY": cos.secret_key,
        "PROXY_COS_BUCKET": BUCKET,
        "PROXY_COS_REGION": REGION,
        "PROXY_COS_DOMAIN": cos.domain,
        "PROXY_COS_SCHEME": "http",
        **extra,
    }


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.kill()

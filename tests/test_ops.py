"""The internal listener: health, readiness, metrics, and nothing of it on the public port."""

from __future__ import annotations

import json
import socket
import time

import pytest

from proxy_service.config import Config, ConfigError
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer, pattern
from tests.support.http import request
from tests.support.proxy import running
from tests.support.redis_server import RedisServer
from tests.support.scrape import delta, scrape, value

BODY = pattern(0, 50_000)


def test_health_and_readiness(tmp_path: object) -> None:
    with running(Config()) as proxy:
        assert request(proxy.internal_url + "/healthz").body == b"ok\n"
        assert request(proxy.internal_url + "/healthz", method="HEAD").status == 200
        ready = request(proxy.internal_url + "/readyz")
        assert ready.status == 200
        assert ready.header("cache-control") == "no-store"
        assert json.loads(ready.body) == {"status": "ready", "redis": "off", "storage": "local"}
        assert value(scrape(proxy.internal_url), "proxy_redis_configured") == 0  # no refresher


def test_ops_endpoints_are_not_on_the_public_port() -> None:
    with running(Config()) as proxy:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert request(proxy.base_url + path).status == 404
        # ...and images are not served on the internal one.
        assert request(proxy.internal_url + "/images/sample.png").status == 404
        assert request(proxy.base_url + "/images/sample.png").status == 200


def test_redis_outage_degrades_but_stays_ready(
    cos: CosTestServer, cos_config: ConfigFactory, private_redis: RedisServer
) -> None:
    with running(cos_config(redis_url=private_redis.url)) as proxy:
        first = json.loads(request(proxy.internal_url + "/readyz").body)
        assert first["redis"] == "up"
        assert value(scrape(proxy.internal_url), "proxy_redis_configured") == 1
        private_redis.kill()
        ready = request(proxy.internal_url + "/readyz")
        assert ready.status == 200  # an outage must not take every pod out of the Service
        assert json.loads(ready.body) == {"status": "degraded", "redis": "down", "storage": "cos"}
        assert value(scrape(proxy.internal_url), "proxy_redis_up") == 0


def test_internal_port_must_differ_from_public() -> None:
    with pytest.raises(ConfigError, match="PROXY_INTERNAL_PORT"):
        Config.load({"PROXY_PORT": "9000", "PROXY_INTERNAL_PORT": "9000"})


def test_metrics_follow_a_short_load(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/cat.png", BODY)
    cos.put_pattern("images/big.bin", 8 * 1024 * 1024)
    with running(cos_config(allow_mode_override=True)) as proxy:
        before = scrape(proxy.internal_url)
        for _ in range(5):
            assert request(proxy.base_url + "/images/cat.png").body == BODY
        assert request(proxy.base_url + "/images/cat.png", method="HEAD").status == 200
        assert request(proxy.base_url + "/images/cat.png?mode=redirect").status == 302
        assert request(proxy.base_url + "/images/missing.png").status == 404
        assert request(proxy.base_url + "/images/..%2F").status == 400
        cos.fail_next(500, count=3)
        assert request(proxy.base_url + "/images/big.bin").status == 502
        # A client that leaves mid-stream.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /images/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(65536)
        cos.wait_until(lambda: proxy.app.origin.in_flight == 0)
        time.sleep(0.1)
        after = scrape(proxy.internal_url)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert d("proxy_requests_total", method="GET", mode="stream", status_class="2xx") == 6
    assert d("proxy_requests_total", method="HEAD", mode="stream", status_class="2xx") == 1
    assert d("proxy_requests_total", method="GET", mode="redirect", status_class="3xx") == 1
    assert d("proxy_requests_total", status_class="4xx") == 2
    assert d("proxy_requests_total", status_class="5xx") == 1
    assert d("proxy_url_cache_lookups_total", result="miss") == 3  # cat, missing, big
    assert d("proxy_url_cache_lookups_total", result="local_hit") == 7
    assert d("proxy_signings_total") == 3
    assert d("proxy_errors_total", label="not_found") == 1
    assert d("proxy_errors_total", label="bad_id") == 1
    assert d("proxy_errors_total", label="upstream_error") == 1
    assert d("proxy_upstream_errors_total", type="5xx") == 3
    assert d("proxy_upstream_retries_total") == 2
    assert d("proxy_upstream_responses_total", status_class="2xx") == 7
    assert d("proxy_upstream_responses_total", status_class="4xx") == 1
    assert d("proxy_client_disconnects_total") == 1
    assert d("proxy_response_bytes_total") >= 5 * len(BODY)
    assert d("proxy_request_duration_seconds_count", mode="stream") == 10
    assert d("proxy_time_to_first_byte_seconds_count", mode="redirect") == 1
    assert value(after, "proxy_streams_in_flight") == 0
    assert value(after, "proxy_upstream_pool_in_use") == 0
    for (name, _labels), _ in after.items():
        for forbidden in ("cat.png", "q-signature", cos.secret_key):
            assert forbidden not in name
    assert not any("cat.png" in v or "images/" in v for (_, labels) in after for _, v in labels), (
        "an id or key leaked into a label"
    )


def test_gauges_show_a_stream_while_it_is_open(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put_pattern("images/big.bin", 32 * 1024 * 1024)
    with running(cos_config()) as proxy:
        # A client that stops reading: the stream stays open, held by backpressure.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET /images/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(65536)
            during = scrape(proxy.internal_url)
        cos.wait_until(lambda: proxy.app.origin.in_flight == 0)
        after = scrape(proxy.internal_url)
    assert value(during, "proxy_upstream_pool_in_use") == 1
    assert value(during, "proxy_streams_in_flight") == 1
    assert value(after, "proxy_upstream_pool_in_use") == 0

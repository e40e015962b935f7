"""Every Prometheus metric in one place. Labels are low-cardinality by construction: never an id,
key or URL, only small fixed sets (tier, method, mode, status class, error label).

Multiprocess (`serve --workers N`): the CLI empties `Config.metrics_dir` and exports it as
PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client (which reads it at import);
gauges say how their per-process values combine.
"""

from __future__ import annotations

import glob
import os
from typing import Any, ClassVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Hot path.
URL_CACHE = Counter(
    "proxy_url_cache_lookups",
    "URL cache lookups by result: local_hit, redis_hit, miss (signed) or negative_hit",
    ["result"],
)
SIGNINGS = Counter("proxy_signings", "Presigned URLs made by the proxy (misses and re-signs)")
RESIGNS = Counter("proxy_resigns", "Re-signs after the origin refused a URL (403)")
REQUESTS = Counter("proxy_requests", "Requests answered", ["method", "mode", "status_class"])
ERRORS = Counter("proxy_errors", "Requests answered with a typed error, by label", ["label"])
DURATION = Histogram(
    "proxy_request_duration_seconds", "Whole request, to the last byte", ["mode"], buckets=_BUCKETS
)
TTFB = Histogram(
    "proxy_time_to_first_byte_seconds",
    "Request start to response headers",
    ["mode"],
    buckets=_BUCKETS,
)
BYTES = Counter("proxy_response_bytes", "Body bytes sent to clients")
STREAMS = Gauge(
    "proxy_streams_in_flight", "Responses being streamed now", multiprocess_mode="livesum"
)
DISCONNECTS = Counter("proxy_client_disconnects", "Clients gone before the body was complete")
UPSTREAM = Counter("proxy_upstream_responses", "Origin responses by status class", ["status_class"])
UPSTREAM_ERRORS = Counter(
    "proxy_upstream_errors", "Origin failures: connect, timeout, 5xx, aborted (mid-body)", ["type"]
)
RETRIES = Counter("proxy_upstream_retries", "Origin requests retried")
POOL_IN_USE = Gauge(
    "proxy_upstream_pool_in_use", "Upstream responses open now", multiprocess_mode="livesum"
)
OBJECT_CACHE = Counter(
    "proxy_object_cache_lookups",
    "Small-object cache: hit (fresh), revalidated (304 upstream), stale (refetched), miss",
    ["result"],
)
OBJECT_CACHE_BYTES = Gauge(
    "proxy_object_cache_bytes", "Bytes held by the small-object cache", multiprocess_mode="livesum"
)
REDIS_ERRORS = Counter("proxy_redis_errors", "Redis calls that failed (served without Redis)")
REDIS_UP = Gauge(
    "proxy_redis_up", "1 if Redis answered the last check, 0 if not", multiprocess_mode="livemin"
)
REDIS_CONFIGURED = Gauge(
    "proxy_redis_configured",
    "1 when this proxy uses Redis, and so relies on a refresher to renew its URLs",
    multiprocess_mode="livemax",
)

# Refresher.
CYCLES = Counter("refresher_cycles", "Refresher cycles completed")
CLAIMED = Counter("refresher_claimed", "Ids claimed for refresh")
REFRESHED = Counter("refresher_refreshed", "Ids re-signed")
FAILED = Counter("refresher_failed", "Re-signs that failed (retried after the lease)")
RETIRED = Counter("refresher_retired", "Ids retired (idle or gone)")
LAG = Gauge(
    "refresher_lag_seconds", "How late the most overdue id was", multiprocess_mode="livemax"
)
INDEX_SIZE = Gauge("refresher_index_size", "Ids in the expiry index", multiprocess_mode="livemax")


class Tally:
    """A counter child counted in a plain int on the hot path: prometheus-client takes a lock on
    every call. `flush_tallies` hands the counts over (every second and before each scrape)."""

    __slots__ = ("child", "count")
    everyone: ClassVar[list[Tally]] = []

    def __init__(self, child: Any) -> None:
        self.child = child
        self.count = 0
        Tally.everyone.append(self)

    def inc(self) -> None:
        self.count += 1


def flush_tallies() -> None:
    for tally in Tally.everyone:
        if tally.count:
            tally.child.inc(tally.count)
            tally.count = 0


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def scrape(multiprocess_dir: str) -> tuple[bytes, str]:
    """The exposition text for /metrics (every worker's values when multiprocess)."""
    if not multiprocess_dir:
        return generate_latest(), CONTENT_TYPE_LATEST
    _reap_dead_workers(multiprocess_dir)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_dead(multiprocess_dir: str, pid: int) -> None:
    if multiprocess_dir:
        multiprocess.mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]


def _reap_dead_workers(directory: str) -> None:
    # uvicorn has no child-exit hook: a killed worker's live gauges would otherwise linger.
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(path.rsplit("_", 1)[1].split(".")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass

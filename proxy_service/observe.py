"""What every request leaves behind: its metrics and one access-log line.

`Probe` wraps the ASGI `send` to see the status, the time of the first byte and the body bytes,
so the hot path does not thread that bookkeeping through every branch.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from . import metrics

access_log = logging.getLogger("proxy_service.access")


class Probe:
    __slots__ = ("bytes", "first_byte", "send", "started", "status")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.started = time.perf_counter()
        self.status = 500
        self.first_byte = 0.0
        self.bytes = 0

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.first_byte = time.perf_counter()
        else:
            self.bytes += len(message.get("body", b""))
        await self.send(message)


class _Histogram:
    """Bucket counts kept locally, added to a prometheus-client histogram child on flush."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # prometheus-client stores non-cumulative buckets: the first bound >= value, as here.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        for i, count in enumerate(self.counts):
            if count:
                self.child._buckets[i].inc(count)
                self.counts[i] = 0
        if self.total:
            self.child._sum.inc(self.total)
            self.total = 0.0


class Observer:
    """Counts in plain ints on the hot path; `flush` (every second, and before each scrape)
    hands them to prometheus-client, whose every call takes a lock and walks the buckets
    (measured: half of the per-request cost of a cached answer)."""

    def __init__(
        self, access: bool, gauges: Sequence[tuple[Any, Callable[[], float]]] = ()
    ) -> None:
        self._access = access
        self._gauges = gauges  # (gauge, read): set on flush rather than moved on every request
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations = {
            mode: (_Histogram(metrics.DURATION.labels(mode)), _Histogram(metrics.TTFB.labels(mode)))
            for mode in ("stream", "redirect")
        }
        self._bytes = 0

    def observe(self, probe: Probe, method: str, mode: str, tier: str, image_id: str) -> None:
        started = probe.started
        elapsed = time.perf_counter() - started
        status = probe.status
        key = (method, mode, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        duration, ttfb = self._durations[mode]
        duration.observe(elapsed)
        if probe.first_byte:
            ttfb.observe(probe.first_byte - started)
        self._bytes += probe.bytes
        if self._access:
            access_log.info(
                "request",
                extra={
                    "image_id": image_id,
                    "method": method,
                    "status": status,
                    "mode": mode,
                    "tier": tier,
                    "bytes": probe.bytes,
                    "duration_ms": round(elapsed * 1000, 2),
                    "ttfb_ms": round((probe.first_byte - started) * 1000, 2)
                    if probe.first_byte
                    else None,
                },
            )

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        for (method, mode, status), count in requests.items():
            metrics.REQUESTS.labels(method, mode, metrics.status_class(status)).inc(count)
        for histograms in self._durations.values():
            for histogram in histograms:
                histogram.flush()
        if self._bytes:
            metrics.BYTES.inc(self._bytes)
            self._bytes = 0
        for gauge, read in self._gauges:
            gauge.set(read())
        metrics.flush_tallies()

"""What every request leaves behind: its metrics and one access-log line.

`Probe` wraps the ASGI `send` to see the status, the time of the first byte and the body bytes,
so the hot path does not thread that bookkeeping through every branch.
"""

from __future__ import annotations

import logging
import time
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


class Observer:
    def __init__(self, access: bool) -> None:
        self._access = access
        # Label children resolved once: `.labels()` takes a lock and a dict lookup per call.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._durations = {
            mode: (metrics.DURATION.labels(mode), metrics.TTFB.labels(mode))
            for mode in ("stream", "redirect")
        }

    def observe(self, probe: Probe, method: str, mode: str, tier: str, image_id: str) -> None:
        started = probe.started
        elapsed = time.perf_counter() - started
        status = probe.status
        key = (method, mode, status // 100)
        counter = self._requests.get(key)
        if counter is None:
            counter = metrics.REQUESTS.labels(method, mode, metrics.status_class(status))
            self._requests[key] = counter
        counter.inc()
        duration, ttfb = self._durations[mode]
        duration.observe(elapsed)
        if probe.first_byte:
            ttfb.observe(probe.first_byte - started)
        if probe.bytes:
            metrics.BYTES.inc(probe.bytes)
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

"""Metrics across `serve --workers 2`: prometheus-client multiprocess mode, counters add up."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import cos_env
from tests.support.cos_server import CosTestServer
from tests.support.http import request
from tests.support.proxy import ProxyProcess
from tests.support.scrape import scrape, value


def _children(pid: int) -> list[int]:
    """The uvicorn workers of a supervisor (not multiprocessing's resource tracker)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                out.append(int(child))
    return out


def test_two_workers_counters_add_up(cos: CosTestServer, tmp_path: Path) -> None:
    cos.put("images/cat.png", b"cat")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_12345.db").write_bytes(b"stale from an earlier run")
    env = cos_env(cos, PROXY_METRICS_DIR=str(metrics_dir))
    with ProxyProcess(env, "--workers", "2") as proxy:
        deadline = time.monotonic() + 10
        while len(_children(proxy.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(40):  # a new connection each: both workers take some
            assert request(proxy.base_url + "/images/cat.png").body == b"cat"
        # Each worker hands its counts to prometheus-client every second (and before a scrape
        # it serves itself): within a second or two, the scrape adds both workers up.
        deadline = time.monotonic() + 5
        while value(samples := scrape(proxy.internal_url), "proxy_requests_total") < 40:
            assert time.monotonic() < deadline, "the workers' counts never added up"
            time.sleep(0.2)
        assert value(samples, "proxy_requests_total", status_class="2xx") == 40
        # Each worker signs its first miss; the rest are LRU hits.
        misses = value(samples, "proxy_url_cache_lookups_total", result="miss")
        hits = value(samples, "proxy_url_cache_lookups_total", result="local_hit")
        assert 1 <= misses <= 2
        assert misses + hits == 40
        assert value(samples, "proxy_streams_in_flight") == 0
        pids = {f.name.rsplit("_", 1)[1].split(".")[0] for f in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2, pids  # both workers wrote, and the stale file was wiped

        # A killed worker is replaced; its live gauges are reaped, counters are kept.
        victim = _children(proxy.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while victim in _children(proxy.pid) or len(_children(proxy.pid)) < 2:
            assert time.monotonic() < deadline, "worker not replaced"
            time.sleep(0.1)
        assert request(proxy.base_url + "/images/cat.png").status == 200
        deadline = time.monotonic() + 5
        while value(samples := scrape(proxy.internal_url), "proxy_requests_total") < 41:
            assert time.monotonic() < deadline, "counts were lost with the killed worker"
            time.sleep(0.2)
        assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))

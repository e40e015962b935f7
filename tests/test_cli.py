"""`proxy-service serve` as a user runs it: a real process, configured by environment and flags."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

from proxy_service.config import SAMPLE_ROOT
from tests.conftest import cos_env
from tests.support.cos_server import CosTestServer
from tests.support.http import request
from tests.support.proxy import ProxyProcess

SAMPLE = (Path(SAMPLE_ROOT) / "images" / "sample.png").read_bytes()


def test_serve_defaults_to_the_embedded_sample() -> None:
    with ProxyProcess({}) as proxy:
        reply = request(proxy.base_url + "/images/sample.png")
    assert reply.status == 200
    assert reply.body == SAMPLE
    assert reply.header("content-type") == "image/png"
    assert "server" not in reply.headers


def test_flags_override_environment(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.jpg").write_bytes(b"jpeg")
    env = {"PROXY_LOCAL_ROOT": "/nonexistent", "PROXY_KEY_TEMPLATE": "images/{id}"}
    args = ("--local-root", str(tmp_path), "--key-template", "pics/{id}")
    with ProxyProcess(env, *args) as proxy:
        assert request(proxy.base_url + "/images/x.jpg").body == b"jpeg"


def test_bad_configuration_names_the_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy_service", "serve"],
        env={"PROXY_STORAGE": "cos", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "PROXY_COS_SECRET_ID" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_workers_serve(tmp_path: Path) -> None:
    with ProxyProcess({}, "--workers", "2") as proxy:
        for _ in range(10):
            assert request(proxy.base_url + "/images/sample.png").body == SAMPLE


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_streaming_200_mib_keeps_memory_flat(cos: CosTestServer) -> None:
    size = 200 * 1024 * 1024
    cos.put_pattern("images/huge.bin", size)
    env = cos_env(cos)
    with ProxyProcess(env) as proxy:
        assert (
            request(proxy.base_url + "/images/huge.bin", headers={"Range": "bytes=0-0"}).status
            == 206
        )
        baseline = _rss_kib(proxy.pid)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_kib(proxy.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        try:
            conn.request("GET", "/images/huge.bin")
            resp = conn.getresponse()
            received = 0
            while chunk := resp.read(1 << 20):
                received += len(chunk)
        finally:
            conn.close()
            done.set()
            sampler.join()
    assert received == size
    growth_mib = (peak - baseline) / 1024
    print(f"RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < 32, f"RSS grew {growth_mib:.1f} MiB streaming 200 MiB"

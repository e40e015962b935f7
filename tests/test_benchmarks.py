"""The benchmark harness, end to end in its smoke form: every requested scenario x contender is
measured with positive numbers and ratios and no errors, the proxy's bytes are verified, a
proxy that answers wrong bytes stops the run, and no child process outlives it.

Runs with whatever is installed (nginx, wrk) and also with the fallbacks forced, so it passes on
a machine without either."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.nginx import find_nginx
from benchmarks.objects import make_object
from benchmarks.verify import VerificationError, check_object, check_redirect

REPO = Path(__file__).resolve().parent.parent
POSITIVE = ("req_s", "mib_s", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mib", "ratio_to_direct")


def run_harness(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    results = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--smoke",
            "--results-dir",
            str(results),
            "--tmp-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert_ports_closed(done.stdout)
    return done, results


def assert_ports_closed(stdout: str) -> None:
    """Every server the harness started is gone once it has exited."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("origin:")), "")
    ports = {int(p) for p in re.findall(r":(\d+)", line)}
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


def check_results(data: dict[str, Any], scenarios: list[str], contenders: dict[str, str]) -> None:
    """`contenders`: name -> the scenarios it is expected in ("stream", "redirect" or "all")."""
    results = data["results"]
    assert list(results) == scenarios
    with_nginx = "nginx" in contenders
    for scenario in scenarios:
        expected = {
            name
            for name, where in contenders.items()
            if where == "all" or (where == "redirect") == (scenario == "redirect")
        }
        row = results[scenario]
        assert set(row) == expected, scenario
        for name, entry in row.items():
            where = f"{scenario} x {name}"
            assert entry["errors"] == 0, (where, entry["runs"])
            assert entry["requests"] > 0, where
            for key in POSITIVE:
                assert entry[key] > 0, (where, key, entry[key])
            if with_nginx:
                assert entry["ratio_to_nginx"] > 0, where
            if entry["targets"]:
                assert entry["targets"]["ok"], (where, entry["targets"])
    verified = {(v["scenario"], v["contender"]) for v in data["verification"]}
    assert verified == {(s, c) for s in scenarios for c in results[s]}


@pytest.mark.slow
def test_smoke_run_with_installed_tools(tmp_path: Path) -> None:
    scenarios = ["small", "miss", "redirect"]
    done, results = run_harness(tmp_path, "--scenarios", ",".join(scenarios))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((results / "latest.json").read_text())
    contenders = {"direct": "all", "proxy-w1": "stream", "proxy-redirect-w1": "redirect"}
    if find_nginx():
        contenders["nginx"] = "all"
    check_results(data, scenarios, contenders)
    assert data["meta"]["origin"] == ("nginx" if find_nginx() else "builtin")
    assert (results / "latest.svg").read_text().startswith("<svg")
    assert len(list(results.glob("*.json"))) == 2  # <timestamp>.json and latest.json
    assert "proxy-w1" in done.stdout  # the table


@pytest.mark.slow
def test_smoke_run_with_fallbacks(tmp_path: Path) -> None:
    scenarios = ["small", "redirect", "huge", "slow"]
    done, results = run_harness(
        tmp_path,
        "--origin=builtin",
        "--load=bundled",
        "--contenders=direct,proxy",
        "--fresh-proxy",
        "--duration=0.5",
        f"--scenarios={','.join(scenarios)}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((results / "latest.json").read_text())
    assert (data["meta"]["origin"], data["meta"]["load"]) == ("builtin", "bundled")
    contenders = {"direct": "all", "proxy-w1": "stream", "proxy-redirect-w1": "redirect"}
    check_results(data, scenarios, contenders)
    assert data["results"]["huge"]["proxy-w1"]["targets"]["rss_growth_mib_below"] == 64


FAKE_PROXY = """
import http.server, os

class Wrong(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"not the object"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

port = int(os.environ["PROXY_PORT"])
http.server.ThreadingHTTPServer(("127.0.0.1", port), Wrong).serve_forever()
"""


def test_a_proxy_returning_wrong_bytes_stops_the_run(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "proxy_service"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAKE_PROXY)
    done, results = run_harness(
        tmp_path,
        f"--proxy-src={fake.parent}",
        "--origin=builtin",
        "--load=bundled",
        "--contenders=proxy",
        "--scenarios=small",
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "VerificationError" in done.stderr
    assert "wrong body" in done.stderr
    assert not results.exists()


@pytest.fixture
def wrong_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:1/elsewhere.bin?x=1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"x" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_verification_rejects_wrong_answers(tmp_path: Path, wrong_server: str) -> None:
    obj = make_object(tmp_path, "small.bin", 100)
    with pytest.raises(VerificationError, match="wrong body"):
        check_object(f"{wrong_server}/small.bin", obj)
    with pytest.raises(VerificationError, match="expected 302"):
        check_redirect(f"{wrong_server}/small.bin", wrong_server, obj, signed=True)
    with pytest.raises(VerificationError, match=r"is not small\.bin"):
        check_redirect(f"{wrong_server}/redirect", wrong_server, obj, signed=True)
    with pytest.raises(VerificationError, match="non-loopback"):
        check_object("http://example.com/small.bin", obj)


@pytest.mark.parametrize("origin", ["auto", "builtin"])
def test_client_comparison_smoke(tmp_path: Path, origin: str) -> None:
    """`python -m benchmarks clients`: every client fetched every object whole (the run stops on a
    wrong length) and got a cost; the floor client is the unit of the `x floor` column."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "clients",
            "--smoke",
            "--origin",
            origin,
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["origin"] == ("builtin" if origin == "builtin" or not find_nginx() else "nginx")
    assert list(data["results"]) == ["small.bin", "large.bin"]
    for row in data["results"].values():
        assert {"proxy-upstream", "aiohttp", "floor"} <= set(row)
        for entry in row.values():
            assert entry["cpu_us_per_req"] > 0
            assert entry["req_s"] > 0
        assert row["floor"]["cpu_x_floor"] == 1.0
    assert "proxy-upstream" in done.stdout

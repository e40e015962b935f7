"""Driving load: wrk when installed (parsed from its text output), else the bundled generator."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .objects import MIB
from .procs import run_bounded

# wrk picks one request per connection when the script has no request(); with one, it calls it
# for every request: a counter makes every id new (the URL-cache miss scenario).
MISS_LUA = """
counter = 0
prefix = "/"
function init(args)
  prefix = args[1]
end
function request()
  counter = counter + 1
  return wrk.format("GET", prefix .. counter)
end
"""

_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE = {"B": 1, "KB": 1024, "MB": MIB, "GB": 1024 * MIB, "TB": 1024 * 1024 * MIB}


class LoadError(RuntimeError):
    """The load tool failed or printed something we cannot read."""


@dataclass
class LoadResult:
    tool: str
    requests: int
    elapsed: float
    bytes: int
    p50_ms: float
    p99_ms: float
    errors: int
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def req_s(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / self.elapsed if self.elapsed > 0 else 0.0


def find_wrk() -> str | None:
    """$BENCHMARKS_WRK if set (empty: act as if wrk were not installed), else the PATH."""
    if "BENCHMARKS_WRK" in os.environ:
        return os.environ["BENCHMARKS_WRK"] or None
    return shutil.which("wrk")


def wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def run_wrk(
    binary: str,
    base_url: str,
    path: str,
    vary: bool,
    connections: int,
    duration: float,
    cpus: set[int] | None,
    script_dir: Path,
) -> LoadResult:
    seconds = max(1, math.ceil(duration))  # wrk takes whole seconds
    argv = [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if vary:
        script = script_dir / "miss.lua"
        script.write_text(MISS_LUA)
        argv += ["-s", str(script), base_url + "/", "--", path]
    else:
        argv.append(base_url + path)
    done = run_bounded(argv, timeout=seconds + 30, cpus=cpus)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> LoadResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", text)
    if total is None:
        raise LoadError(f"cannot parse wrk output:\n{text}")
    requests = int(total.group(1))
    elapsed = float(total.group(2)) * _TIME[total.group(3)] / 1000
    read = float(total.group(4)) * _SIZE[total.group(5)]
    pcts: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(\w+)\s*$", text, re.M):
        pcts[pct] = float(value) * _TIME[unit]
    kinds: dict[str, int] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                kinds[f"socket {name}"] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        kinds["non-2xx/3xx"] = int(non2xx.group(1))
    return LoadResult(
        tool="wrk",
        requests=requests,
        elapsed=elapsed,
        bytes=int(read),
        p50_ms=pcts.get("50", 0.0),
        p99_ms=pcts.get("99", 0.0),
        errors=sum(kinds.values()),
        error_kinds=kinds,
    )


def run_bundled(
    port: int,
    path: str,
    *,
    vary: bool = False,
    connections: int,
    duration: float,
    status: int = 200,
    requests: int = 0,
    slow_read: int = 0,
    slow_interval: float = 0.05,
    cpus: set[int] | None = None,
    timeout: float | None = None,
) -> LoadResult:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--port",
        str(port),
        "--path",
        path,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--status",
        str(status),
        "--requests",
        str(requests),
    ]
    if vary:
        argv.append("--vary")
    if slow_read:
        argv += ["--slow-read", str(slow_read), "--slow-interval", str(slow_interval)]
    done = run_bounded(argv, timeout=timeout or duration + 60, cpus=cpus)
    if done.returncode != 0:
        raise LoadError(f"loadgen exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    try:
        data = json.loads(done.stdout)
    except ValueError:
        raise LoadError(f"cannot parse loadgen output: {done.stdout[-500:]!r}") from None
    return LoadResult(
        tool="bundled",
        requests=int(data["requests"]),
        elapsed=float(data["elapsed"]),
        bytes=int(data["bytes"]),
        p50_ms=float(data["p50_ms"]),
        p99_ms=float(data["p99_ms"]),
        errors=int(data["errors"]),
        error_kinds={str(k): int(v) for k, v in data["error_kinds"].items()},
    )

"""One run: start everything, verify every contender once, then measure interleaved cells
(for repeat: for scenario: for contender) and take the median of the repeats."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import load, nginx
from .contenders import (
    Contender,
    Origin,
    spawn_proxy,
    start_nginx_proxy,
    start_origin,
    wait_proxy,
)
from .objects import MIB, Obj, make_objects
from .plan import (
    KINDS,
    SCENARIOS,
    Options,
    Scenario,
    contender_kinds,
    target_path,
)
from .procs import (
    REPO,
    Child,
    RssSampler,
    cpu_seconds,
    others_cpu_seconds,
    raise_nofile_limit,
    steal_seconds,
    stop_all,
    tree_pids,
)
from .summary import Cell, aggregate, source_state
from .verify import check_object, check_redirect


class SetupError(RuntimeError):
    pass


class Runner:
    def __init__(self, opts: Options, log: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.log = log or _print
        unknown = [s for s in opts.scenarios if s not in SCENARIOS]
        if unknown:
            raise SetupError(f"unknown scenario(s): {', '.join(unknown)}")
        bad_kinds = [k for k in opts.kinds if k not in KINDS]
        if bad_kinds or not opts.kinds:
            raise SetupError(f"--contenders: choose from {', '.join(KINDS)}")
        if opts.repeats < 1 or opts.duration <= 0 or opts.connections < 1:
            raise SetupError("--repeats, --duration and --connections must be positive")
        self.scenarios = [SCENARIOS[s] for s in opts.scenarios]
        self.nginx_bin = nginx.find_nginx()
        if "nginx" in opts.kinds and not self.nginx_bin:
            self.log("nginx is not installed: no nginx contender, no ratio to nginx")
        self.wrk_bin = load.find_wrk() if opts.load != "bundled" else None
        if opts.origin == "nginx" and not self.nginx_bin:
            raise SetupError("--origin nginx: nginx is not installed")
        if opts.load == "wrk" and not self.wrk_bin:
            raise SetupError("--load wrk: wrk is not installed")
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = opts.pin and len(cpus) >= 2
        # Server under test on one core; origin, load generator and this harness on another.
        self.server_cpus = {cpus[0]} if self.pinned else None
        self.load_cpus = {cpus[1]} if self.pinned else None
        self.origin: Origin | None = None
        self.contenders: dict[str, Contender] = {}
        self.objs: dict[str, Obj] = {}
        self.tmp = Path(".")
        self.proxy_src = REPO
        self.proxy_digest = ""
        self.proxy_state: dict[str, Any] = {}

    # --- set-up ---------------------------------------------------------------------------------

    def _snapshot_proxy(self) -> Path:
        """Copy proxy_service/ into the run's directory and run that copy in every cell.

        The checkout may change while a run goes on (others edit it; fresh processes would pick
        the edits up), and one run must measure one version of the code.
        """
        self.proxy_state = source_state(self.opts.proxy_src or REPO)
        src = (self.opts.proxy_src or REPO) / "proxy_service"
        if not (src / "__main__.py").is_file():
            raise SetupError(f"no proxy_service package in {src.parent}")
        dest = self.tmp / "proxy-src"
        shutil.copytree(src, dest / "proxy_service", ignore=shutil.ignore_patterns("__pycache__"))
        digest = hashlib.sha256()
        for path in sorted((dest / "proxy_service").rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
        self.proxy_digest = digest.hexdigest()
        return dest

    def _start(self) -> None:
        opts = self.opts
        self.proxy_src = self._snapshot_proxy()
        huge = opts.huge_size if any(s.obj == "huge" for s in self.scenarios) else 0
        self.log(f"objects: 16 KiB, 256 KiB, 4 MiB{f', {huge // MIB} MiB' if huge else ''}")
        self.objs = make_objects(self.tmp / "objects", huge)
        origin_nginx = self.nginx_bin if opts.origin != "builtin" else None
        self.origin = start_origin(
            origin_nginx, self.tmp, self.tmp / "objects", self.objs["small"], self.load_cpus
        )
        self.contenders["direct"] = Contender(
            "direct", "direct", self.origin.port, self.origin.child
        )
        proxies = []
        kinds = {k for s in self.scenarios for k in contender_kinds(s, opts.kinds)}
        for mode, kind in (("stream", "proxy"), ("redirect", "proxy-redirect")):
            if kind in kinds:
                for workers in opts.workers:
                    c = spawn_proxy(
                        self.tmp,
                        self.origin,
                        mode,
                        workers,
                        self.server_cpus,
                        opts.proxy_env,
                        self.proxy_src,
                    )
                    proxies.append(c)
        if "nginx" in kinds and self.nginx_bin:
            self.contenders["nginx"] = start_nginx_proxy(
                self.nginx_bin, self.tmp, self.origin, self.objs["small"], self.server_cpus
            )
        for c in proxies:
            wait_proxy(c)
            self.contenders[c.name] = c
        self.log(
            f"origin: {self.origin.kind} on :{self.origin.port}; contenders: "
            + ", ".join(f"{c.name} :{c.port}" for c in self.contenders.values())
        )

    def cells(self, scenario: Scenario) -> list[Contender]:
        out = []
        for kind in contender_kinds(scenario, self.opts.kinds):
            out += [c for c in self.contenders.values() if c.kind == kind]
        return out

    def _verify(self) -> list[dict[str, str]]:
        assert self.origin is not None
        done: dict[tuple[str, str], str] = {}
        report = []
        for scenario in self.scenarios:
            obj = self.objs[scenario.obj]
            for c in self.cells(scenario):
                path = target_path(scenario, c.kind, obj.name, "verify")
                if scenario.vary:
                    path += uuid.uuid4().hex[:12]
                key = (c.name, path)
                if key not in done:
                    url = c.base_url + path
                    if scenario.redirect:
                        signed = c.kind == "proxy-redirect"
                        done[key] = check_redirect(url, self.origin.base_url, obj, signed)
                    else:
                        done[key] = check_object(url, obj)
                report.append(
                    {"scenario": scenario.name, "contender": c.name, "path": path, "ok": done[key]}
                )
        self.log(f"verified {len(report)} scenario x contender responses")
        return report

    def _warm_up(self) -> None:
        if self.opts.warmup <= 0:
            return
        small = self.objs["small"]
        for c in self.contenders.values():
            scenario = SCENARIOS["redirect" if c.kind == "proxy-redirect" else "small"]
            path = target_path(scenario, c.kind, small.name, "warm")
            self._rate_load(c, path, scenario, self.opts.warmup)

    # --- measuring ------------------------------------------------------------------------------

    def _rate_load(
        self, c: Contender, path: str, scenario: Scenario, duration: float
    ) -> load.LoadResult:
        if self.wrk_bin:
            return load.run_wrk(
                self.wrk_bin,
                c.base_url,
                path,
                scenario.vary,
                self.opts.connections,
                duration,
                self.load_cpus,
                self.tmp,
            )
        return load.run_bundled(
            c.port,
            path,
            vary=scenario.vary,
            connections=self.opts.connections,
            duration=duration,
            status=scenario.status,
            cpus=self.load_cpus,
        )

    def _load(self, scenario: Scenario, c: Contender, path: str) -> load.LoadResult:
        opts = self.opts
        if scenario.style == "count":
            return load.run_bundled(
                c.port,
                path,
                connections=1,
                duration=600.0,
                requests=opts.huge_requests,
                cpus=self.load_cpus,
            )
        if scenario.style == "slow":
            return load.run_bundled(
                c.port,
                path,
                connections=opts.slow_clients,
                duration=opts.slow_duration,
                slow_read=opts.slow_read,
                slow_interval=opts.slow_interval,
                cpus=self.load_cpus,
            )
        return self._rate_load(c, path, scenario, opts.duration)

    def measure(self, scenario: Scenario, c: Contender) -> Cell:
        assert self.origin is not None
        obj = self.objs[scenario.obj]
        path = target_path(scenario, c.kind, obj.name, uuid.uuid4().hex[:12])
        server, origin = c.server, self.origin.child
        server_pids, origin_pids = tree_pids(server.pid), tree_pids(origin.pid)
        cpu0, ocpu0 = cpu_seconds(server_pids), cpu_seconds(origin_pids)
        others0, steal0, wall0 = others_cpu_seconds(), steal_seconds(), time.monotonic()
        with RssSampler(server.pid) as rss:
            result = self._load(scenario, c, path)
        others1, steal1, wall1 = others_cpu_seconds(), steal_seconds(), time.monotonic()
        cpu1, ocpu1 = cpu_seconds(server_pids), cpu_seconds(origin_pids)
        server.check()
        origin.check()
        if result.requests == 0:
            result.errors += 1
            result.error_kinds["no response completed"] = 1
        n = max(result.requests, 1)
        wall = max(wall1 - wall0, 1e-6)
        return {
            "tool": result.tool,
            "requests": result.requests,
            "elapsed": result.elapsed,
            "req_s": result.req_s,
            "mib_s": result.mib_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.errors,
            "error_kinds": result.error_kinds,
            "cpu_us_per_req": (cpu1 - cpu0) / n * 1e6,
            "origin_cpu_us_per_req": (ocpu1 - ocpu0) / n * 1e6,
            "rss_mib": rss.peak / MIB,
            "rss_growth_mib": (rss.peak - rss.first) / MIB,
            # CPU taken by anything but this benchmark, in % of one core: other processes here,
            # and other guests of the hypervisor (steal). Busy-machine cells are not comparable.
            "noise_pct": (max(0.0, others1 - others0) + (steal1 - steal0)) / wall * 100,
            "steal_pct": (steal1 - steal0) / wall * 100,
        }

    def _restart(self, c: Contender) -> Contender:
        """A fresh proxy process in place of `c`, checked with one request before use."""
        assert self.origin is not None
        c.server.stop()
        mode = "redirect" if c.kind == "proxy-redirect" else "stream"
        new = spawn_proxy(
            self.tmp,
            self.origin,
            mode,
            c.workers,
            self.server_cpus,
            self.opts.proxy_env,
            self.proxy_src,
        )
        wait_proxy(new)
        small = self.objs["small"]
        if mode == "redirect":
            check_redirect(f"{new.base_url}/images/{small.name}", self.origin.base_url, small, True)
        else:
            check_object(f"{new.base_url}/images/{small.name}", small)
        self.contenders[c.name] = new
        return new

    def _measure_quietly(self, scenario: Scenario, c: Contender) -> Cell:
        if self.opts.fresh_proxy and c.kind.startswith("proxy"):
            c = self._restart(c)
        cell = self.measure(scenario, c)
        attempts = 1
        retries = self.opts.noise_retries if scenario.style == "rate" else 0
        while cell["noise_pct"] > self.opts.noise_limit and attempts <= retries:
            attempts += 1
            if self.opts.fresh_proxy and c.kind.startswith("proxy"):
                c = self._restart(c)
            again = self.measure(scenario, c)
            if again["noise_pct"] < cell["noise_pct"]:
                cell = again
        cell["attempts"] = attempts
        return cell

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        opts = self.opts
        raise_nofile_limit()
        affinity = os.sched_getaffinity(0)
        if self.load_cpus:
            # The harness (and its RSS sampler) must not steal the server's core.
            os.sched_setaffinity(0, self.load_cpus)
        started = datetime.now(UTC)
        self.tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-", dir=opts.tmp_dir))
        self.tmp.chmod(0o755)
        try:
            self._start()
            verification = self._verify()
            self._warm_up()
            runs: dict[tuple[str, str], list[Cell]] = {}
            for repeat in range(opts.repeats):
                for scenario in self.scenarios:
                    for c in self.cells(scenario):
                        cell = self._measure_quietly(scenario, c)
                        runs.setdefault((scenario.name, c.name), []).append(cell)
                        self.log(
                            f"[{repeat + 1}/{opts.repeats}] {scenario.name:8} {c.name:18} "
                            f"{cell['req_s']:9.0f} req/s {cell['mib_s']:8.1f} MiB/s "
                            f"p99 {cell['p99_ms']:7.1f} ms  errors {cell['errors']}  "
                            f"noise {cell['noise_pct']:3.0f}% (try {cell['attempts']})"
                        )
            return {
                "meta": self._meta(started),
                "verification": verification,
                "results": aggregate(self.scenarios, self.cells, runs),
            }
        finally:
            stop_all(Child.registry)
            os.sched_setaffinity(0, affinity)
            if opts.keep_tmp:
                self.log(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _meta(self, started: datetime) -> dict[str, Any]:
        opts = self.opts
        options = asdict(opts)
        options["results_dir"] = str(opts.results_dir)
        options["tmp_dir"] = str(opts.tmp_dir) if opts.tmp_dir else None
        options["proxy_env"] = sorted(opts.proxy_env)  # names only: values may be secrets
        options["proxy_src"] = str(opts.proxy_src) if opts.proxy_src else None
        assert self.origin is not None
        return {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),  # the machine's, not this (pinned) process's
                "machine": platform.machine(),
                "kernel": platform.release(),
                "python": sys.version.split()[0],
            },
            "pinned": self.pinned,
            "cpus": {
                "server": sorted(self.server_cpus or []),
                "origin_and_load": sorted(self.load_cpus or []),
            },
            "origin": self.origin.kind,
            "load": "wrk" if self.wrk_bin else "bundled",
            "nginx": nginx.version(self.nginx_bin) if self.nginx_bin else None,
            "wrk": load.wrk_version(self.wrk_bin) if self.wrk_bin else None,
            "proxy": {**self.proxy_state, "sha256": self.proxy_digest},
            "objects": {k: o.size for k, o in self.objs.items()},
            "scenarios": {s.name: s.doc for s in self.scenarios},
            "options": options,
        }


def _print(line: str) -> None:
    print(line, flush=True)


def run(opts: Options, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    return Runner(opts, log).run()

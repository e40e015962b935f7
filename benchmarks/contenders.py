"""The servers under test: the origin itself (`direct`), nginx `proxy_pass`, and the proxy."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import nginx
from .objects import Obj
from .plan import FAKE_SIGNATURE, Kind
from .procs import REPO, Child, free_port

# Dummy credentials: the origin checks no signature, but the proxy signs every miss for real.
COS_ENV = {
    "PROXY_STORAGE": "cos",
    "PROXY_COS_SCHEME": "http",
    "PROXY_COS_SECRET_ID": "AKIDbenchmarkbenchmarkbenchmark00",
    "PROXY_COS_SECRET_KEY": "benchmark-secret-key-not-a-real-one",
    "PROXY_COS_BUCKET": "bench-1250000000",
    "PROXY_COS_REGION": "ap-guangzhou",
    "PROXY_KEY_TEMPLATE": "{id}",
    "PROXY_LOG_LEVEL": "warning",
}


@dataclass
class Contender:
    name: str  # direct, nginx, proxy-w1, proxy-redirect-w2 ...
    kind: Kind
    port: int
    server: Child  # the process tree whose CPU and memory are measured
    workers: int = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Origin:
    kind: str  # "nginx" or "builtin"
    port: int
    child: Child

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def redirect_location(self, obj: Obj) -> str:
        return f"{self.base_url}/{obj.name}?{FAKE_SIGNATURE}"


def start_origin(
    nginx_bin: str | None, tmp: Path, root: Path, small: Obj, cpus: set[int] | None
) -> Origin:
    port = free_port()
    location = f"http://127.0.0.1:{port}/{small.name}?{FAKE_SIGNATURE}"
    if nginx_bin:
        conf = nginx.origin_conf(tmp, port, root, location)
        return Origin("nginx", port, nginx.start_nginx(nginx_bin, "origin", conf, tmp, port, cpus))
    child = Child(
        "origin",
        [
            sys.executable,
            "-m",
            "benchmarks.fileserver",
            "--root",
            str(root),
            "--port",
            str(port),
            "--redirect-location",
            location,
        ],
        tmp / "origin.log",
        cpus=cpus,
        env=_python_env({}),
    )
    child.wait_port(port)
    return Origin("builtin", port, child)


def start_nginx_proxy(
    nginx_bin: str, tmp: Path, origin: Origin, small: Obj, cpus: set[int] | None
) -> Contender:
    port = free_port()
    conf = nginx.proxy_conf(tmp, port, origin.port, origin.redirect_location(small))
    child = nginx.start_nginx(nginx_bin, "nginx-proxy", conf, tmp, port, cpus)
    return Contender("nginx", "nginx", port, child)


def spawn_proxy(
    tmp: Path,
    origin: Origin,
    mode: str,
    workers: int,
    cpus: set[int] | None,
    extra_env: dict[str, str],
    src: Path | None = None,
) -> Contender:
    """Start `python -m proxy_service serve`; call `wait_proxy` before using it.

    `src` is a directory holding the `proxy_service` package to run (default: this checkout).
    """
    port = free_port()
    kind: Kind = "proxy-redirect" if mode == "redirect" else "proxy"
    name = f"{kind}-w{workers}"
    metrics_dir = tmp / f"{name}-metrics"
    metrics_dir.mkdir(exist_ok=True)
    env = _python_env(
        {
            **COS_ENV,
            "PROXY_COS_DOMAIN": f"127.0.0.1:{origin.port}",
            "PROXY_HOST": "127.0.0.1",
            "PROXY_PORT": str(port),
            "PROXY_MODE": mode,
            "PROXY_WORKERS": str(workers),
            # Settings of newer proxy versions (older ones ignore unknown variables): the ops
            # listener on any free port, so several proxies can run side by side, and the
            # multiprocess metrics in the run's temporary directory.
            "PROXY_INTERNAL_HOST": "127.0.0.1",
            "PROXY_INTERNAL_PORT": "0",
            "PROXY_METRICS_DIR": str(metrics_dir),
            **extra_env,
        },
        src or REPO,
    )
    argv = [sys.executable, "-m", "proxy_service", "serve", "--no-access-log"]
    # `python -m` puts the working directory first on sys.path: that picks the package.
    child = Child(name, argv, tmp / f"{name}.log", cpus=cpus, env=env, cwd=src or REPO)
    return Contender(name, kind, port, child, workers)


def wait_proxy(contender: Contender) -> None:
    contender.server.wait_port(contender.port, timeout=30)
    contender.server.pin_tree()


def _python_env(extra: dict[str, str], src: Path = REPO) -> dict[str, str]:
    # The caller's own PROXY_* settings must not leak into the benchmarked configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env

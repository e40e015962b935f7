"""A real nginx with `proxy_cache` (+ `slice`) in front of the proxy: the CDN stand-in.

The config is generated into a directory of the test's own (pid, logs, temp and cache dirs all
there), nginx runs in the foreground as one process (`daemon off; master_process off`) and is
killed when the test ends. `NGINX_CACHE_CONF` is the part a deployment would copy (the README's
"Behind a CDN" shows the same lines).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .proxy import free_port


def nginx_binary() -> str | None:
    """nginx from the PATH, or Debian's /usr/sbin/nginx (not on a non-root PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def require_nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (.ci/run installs it: apt-get install -y nginx)")
    version = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    if "--with-http_slice_module" not in version:
        pytest.fail(f"{binary} lacks the slice module; install Debian's full 'nginx' package")
    return binary


# The caching part, as it would be deployed (upstream name and zone are the README's).
NGINX_CACHE_CONF = """\
    location /images/ {{
        slice              {slice};
        proxy_cache        images;
        proxy_cache_key    $scheme$host$request_uri$slice_range;
        proxy_set_header   Range $slice_range;
        proxy_http_version 1.1;
        proxy_set_header   Connection "";
        proxy_cache_revalidate on;
        proxy_cache_lock   on;
        proxy_pass         http://image_proxy;
        add_header         X-Cache-Status $upstream_cache_status always;
    }}
"""

_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    log_format cdn '$request_method $request_uri range=$http_range '
                   'status=$status cache=$upstream_cache_status '
                   'upstream=$upstream_status bytes=$body_bytes_sent';
    access_log {dir}/access.log cdn;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;

    proxy_cache_path {dir}/cache levels=1:2 keys_zone=images:10m max_size=1g
                     inactive=1h use_temp_path=off;

    upstream image_proxy {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
{cache_conf}    }}
}}
"""


class Nginx:
    """nginx caching `127.0.0.1:<upstream_port>` in 1 MiB slices, listening on a free port."""

    def __init__(self, directory: Path, upstream_port: int, *, slice_size: str = "1m") -> None:
        self.binary = require_nginx()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            _CONF.format(
                dir=self.dir,
                port=self.port,
                upstream_port=upstream_port,
                cache_conf=NGINX_CACHE_CONF.format(slice=slice_size),
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> Nginx:
        check = subprocess.run(
            [self.binary, "-t", "-p", str(self.dir), "-c", str(self.conf), "-e", self.error_log],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.conf), "-e", self.error_log],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.errors()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not start listening:\n{self.errors()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def error_log(self) -> str:
        return str(self.dir / "error.log")

    def errors(self) -> str:
        path = Path(self.error_log)
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self, count: int, timeout: float = 5) -> list[dict[str, str]]:
        """The first `count` access-log entries (waiting for them: nginx logs after replying),
        each as {"request": "GET /images/a.png", "range", "status", "cache", "upstream", "bytes"};
        "upstream" is the proxy's status, "-" when the proxy was not asked."""
        path = self.dir / "access.log"
        deadline = time.monotonic() + timeout
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= count:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(lines)} access-log entries, expected {count}")
            time.sleep(0.01)
        entries = []
        for line in lines[:count]:
            method, uri, *fields = line.split(" ")
            entry = dict(field.split("=", 1) for field in fields)
            entry["request"] = f"{method} {uri}"
            entries.append(entry)
        return entries

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_nginx(directory: Path, upstream_port: int, **options: str) -> Iterator[Nginx]:
    with Nginx(directory, upstream_port, **options) as nginx:
        yield nginx

"""nginx as a non-daemon child with its own generated config: the origin and the reference proxy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .procs import Child


def find_nginx() -> str | None:
    """$BENCHMARKS_NGINX if set (empty: act as if nginx were not installed), else the PATH."""
    if "BENCHMARKS_NGINX" in os.environ:
        return os.environ["BENCHMARKS_NGINX"] or None
    # /usr/sbin is often missing from a non-root PATH.
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _main_conf(tmp: Path, name: str, server: str, upstream: str = "") -> str:
    temp = tmp / f"{name}-temp"
    # As root, nginx would drop its workers to `nobody`, which may not be able to traverse the
    # directory the objects live in: keep them as root (loopback-only benchmark instance).
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
{user}
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{upstream}
{server}
}}
"""


def origin_conf(tmp: Path, port: int, root: Path, redirect_location: str) -> str:
    # The query string is ignored: a presigned COS URL is served like the bare key.
    server = f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location / {{ }}
        location /miss/ {{ try_files /small.bin =404; }}
        location /redirect/ {{ return 302 "{redirect_location}"; }}
    }}"""
    return _main_conf(tmp, "origin", server)


def proxy_conf(tmp: Path, port: int, origin_port: int, redirect_location: str) -> str:
    """The reference: proxy_pass with upstream keep-alive, 64 KiB buffers, no temp files."""
    upstream = f"""
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}"""
    server = f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /images/ {{
            proxy_pass http://origin/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 8 64k;
            proxy_buffer_size 64k;
            proxy_max_temp_file_size 0;
        }}
        location /redirect/ {{ return 302 "{redirect_location}"; }}
    }}"""
    return _main_conf(tmp, "nginx-proxy", server, upstream)


def start_nginx(
    binary: str, name: str, conf_text: str, tmp: Path, port: int, cpus: set[int] | None
) -> Child:
    conf = tmp / f"{name}.conf"
    conf.write_text(conf_text)
    (tmp / f"{name}-temp").mkdir(exist_ok=True)
    child = Child(
        name,
        [binary, "-p", f"{tmp}/", "-e", str(tmp / f"{name}-error.log"), "-c", str(conf)],
        tmp / f"{name}.log",
        cpus=cpus,
    )
    child.wait_port(port)
    child.pin_tree()
    return child


def version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().partition("/")[2] or "unknown"

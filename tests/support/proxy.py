"""Run the proxy under a real uvicorn: in a thread of the test process (so tests can look inside
the app), or as a `proxy-service serve` subprocess (for RSS and CLI behaviour)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import uvicorn

from proxy_service.app import ProxyApp
from proxy_service.config import Config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedProxy:
    """uvicorn (uvloop + httptools, as in production) serving a `ProxyApp` from a thread."""

    def __init__(self, config: Config) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._internal = socket.socket()
        self._internal.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.internal_port: int = self._internal.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.internal_url = f"http://127.0.0.1:{self.internal_port}"
        self.app = ProxyApp(config.replace(port=self.port, internal_port=self.internal_port))
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                loop="uvloop",
                http="httptools",
                lifespan="on",
                log_level="warning",
                access_log=False,
                server_header=False,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock, self._internal]}, daemon=True
        )

    def start(self) -> ThreadedProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        self._internal.close()

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyProcess:
    """`python -m proxy_service serve` in a child process, configured through the environment."""

    def __init__(self, env: Mapping[str, str], *args: str, access_log: bool = False) -> None:
        self.port = free_port()
        self.internal_port = int(env.get("PROXY_INTERNAL_PORT") or free_port())
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.internal_url = f"http://127.0.0.1:{self.internal_port}"
        self._env = {
            **os.environ,
            **env,
            "PROXY_PORT": str(self.port),
            "PROXY_INTERNAL_PORT": str(self.internal_port),
        }
        self._args = args if access_log else ("--no-access-log", *args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> ProxyProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy_service", "serve", *self._args],
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.05)
        raise RuntimeError("proxy did not start listening")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.stop()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        return out

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def running(config: Config) -> Iterator[ThreadedProxy]:
    proxy = ThreadedProxy(config).start()
    try:
        yield proxy
    finally:
        proxy.stop()

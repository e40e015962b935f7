"""A private 3-node Redis Cluster (no replicas) on free loopback ports, for the cluster tests."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int]) -> int:
    """A port whose cluster bus port (port + 10000) is free too: below the ephemeral range, which
    would push the bus port past 65535 (redis-server then refuses to start)."""
    for _ in range(1000):
        port = random.randrange(20_000, 30_000)
        if port not in taken and _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One inline command over a raw socket; returns the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(" ".join(args).encode() + b"\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk or (data.endswith(b"\r\n") and _complete(data)):
                return data


def _complete(data: bytes) -> bool:
    if data[:1] != b"$":
        return True
    header, _, rest = data.partition(b"\r\n")
    size = int(header[1:])
    return size < 0 or len(rest) >= size + 2


class RedisClusterServer:
    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster")
        self.server, self.cli = server, cli
        self.workdir = workdir
        self.ports: list[int] = []
        for _ in range(nodes):
            self.ports.append(free_cluster_port(set(self.ports)))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 20) -> RedisClusterServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for port in self.ports:
                self.procs.append(
                    subprocess.Popen(
                        [
                            self.server,
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            str(self.workdir / f"nodes-{port}.conf"),
                            "--cluster-node-timeout",
                            "5000",
                            "--dir",
                            str(self.workdir),
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self._wait(deadline, port, lambda p: _command(p, "PING").startswith(b"+PONG"))
            subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
            for port in self.ports:
                self._wait(deadline, port, lambda p: b"cluster_state:ok" in self.info(p))
        except BaseException:
            self.kill()
            raise
        return self

    def info(self, port: int) -> bytes:
        return _command(port, "CLUSTER", "INFO")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _wait(self, deadline: float, port: int, ready: Callable[[int], bool]) -> None:
        while True:
            try:
                if ready(port):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not come up")
            time.sleep(0.05)

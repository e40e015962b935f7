"""Child processes (own session, CPU pinning, guaranteed kill) and /proc measurements of a tree."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent  # cwd of children: `python -m benchmarks.*` works
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class ChildError(RuntimeError):
    """A child process failed to start or died; the message carries the tail of its log."""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def raise_nofile_limit() -> None:
    """1 000 slow clients need ~3 000 descriptors across the chain; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """A process in its own session (so its whole group can be killed), logging to a file."""

    registry: list[Child] = []  # every child ever started, for the last-resort cleanup

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.cpus = cpus
        if cpus and shutil.which("taskset"):
            # Pinned before exec, so processes it forks or spawns (workers) inherit the mask.
            argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self._stopped = False
        Child.registry.append(self)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, cpus)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pin_tree(self) -> None:
        """Re-apply the mask to every descendant (without taskset, children may predate it)."""
        if self.cpus:
            for pid in tree_pids(self.pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, self.cpus)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        if not self.alive():
            raise ChildError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                + self.log_tail()
            )

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise ChildError(f"{self.name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left of it after `grace`."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.proc.returncode is None:
                # Not reaped yet, so the leader's pid (a zombie at worst) still names our group:
                # signalling the group cannot reach anybody else's processes.
                _killpg(self.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and group_members(self.pid):
                    time.sleep(0.05)
                _killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            else:
                for pid in group_members(self.pid):  # workers that outlived a dead leader
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._log.close()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the process group `pgid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def stop_all(children: Iterable[Child] | None = None) -> None:
    for child in reversed(list(Child.registry if children is None else children)):
        child.stop()


def run_bounded(
    argv: Sequence[str], timeout: float, cpus: set[int] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool (load generator) pinned and in its own session; kill it on timeout."""
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- /proc measurements -------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    pids = [root]
    i = 0
    while i < len(pids):
        pid = pids[i]
        i += 1
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            continue
        pids.extend(int(p) for p in text.split())
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of the given processes, in seconds.

    From the scheduler's nanosecond run time of every thread (/proc/<pid>/task/*/schedstat);
    utime+stime in /proc/<pid>/stat count whole clock ticks (10 ms), too coarse for a short
    cell. Falls back to them on kernels without schedstat.
    """
    total = 0.0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        if not tasks:
            continue
        if not (tasks[0] / "schedstat").exists():
            total += _stat_seconds(pid)
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, IndexError, ValueError):
                continue
    return total


def _stat_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14, 15 of proc(5)


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


def others_cpu_seconds() -> float:
    """CPU used by every user-space process that is not this harness or one of its children.

    Children's exited descendants count through their cutime/cstime, so short-lived jobs (a test
    suite spawning processes) are seen too. Kernel threads are left out: they do our own network
    work as well (softirq), which is no noise.
    """
    ours = set(tree_pids(os.getpid()))
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) in (0, 2):  # kthreadd and its children
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(statm[1]) * PAGE
    return total


class RssSampler:
    """Samples the summed RSS of a process tree in a thread; `peak` is the largest sample."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._pids = tree_pids(root)
        self.first = rss_bytes(self._pids)
        self.peak = self.first
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._interval):
            n += 1
            if n % 20 == 0:  # workers could be respawned; refresh the tree now and then
                self._pids = tree_pids(self._root)
            self.peak = max(self.peak, rss_bytes(self._pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(tree_pids(self._root)))

"""The processes the benchmark starts and talks to: the daemon and the bare echo service.

Both are started as `tests/conftest.py` starts the daemon: a subprocess with cwd and PYTHONPATH
at the repository root and $NOTIFY_SOCKET naming a datagram socket of ours. A service is ready
when it sends READY=1 there; its "STATUS=listening on ADDR ..." line names the TCP port it bound.
We wait on that event, never on a sleep, and every process started here is stopped by `stop()`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

try:
    from task_runner.server.sandbox.cgroups import own_cgroup
except ImportError:  # an install from before the sandbox package (bench.cpu_per_task holds two against each other)
    from task_runner.server.cgroups import own_cgroup  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
BENCH_TASKS = {"noop": "bench.tasks:noop", "sleep10": "bench.tasks:sleep10", "sleep100": "bench.tasks:sleep100",
               "stubborn": "bench.tasks:stubborn"}
FORKSERVER_MODULE = "task_runner.server.forkserver"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
MIB = 1 << 20


@dataclass
class Service:
    """A started service process, its log and the addresses it announced."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    notify: socket.socket
    addresses: list[str] = field(default_factory=list)
    companions: list[psutil.Process] = field(default_factory=list)  # e.g. the daemon's fork server
    exit_code: int | None = None
    companions_left: int = 0
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def target(self, transport: str) -> str:
        """The address to call: its unix socket, or its TCP port on loopback."""
        for address in self.addresses:
            if address.startswith("unix:") == (transport == "unix"):
                return address
        raise LookupError(f"{self.name} announced no {transport} address: {self.addresses}")

    def log_lines(self) -> list[str]:
        try:
            return [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL if it has not ended in time. Then the same for its companions."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.exit_code is None:
            self.exit_code = self.process.returncode
        _, alive = psutil.wait_procs(self.companions, timeout=5)
        for companion in alive:
            with contextlib.suppress(psutil.Error):
                companion.kill()
        self.companions_left += len(alive)
        self.companions = []
        self.notify.close()
        return self.exit_code


def _read_notifications(sock: socket.socket, timeout_s: float) -> list[str]:
    lines: list[str] = []
    ready, _, _ = select.select([sock], [], [], timeout_s)
    while ready:
        lines += sock.recv(4096).decode(errors="replace").split("\n")
        ready, _, _ = select.select([sock], [], [], 0)
    return lines


def start_service(name: str, argv: list[str], directory: Path) -> Service:
    """Start `argv` with $NOTIFY_SOCKET set; return once it has sent READY=1 (or raise, having stopped it)."""
    directory.mkdir(parents=True, exist_ok=True)
    notify_path = directory / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": python_path}
    log = directory / f"{name}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    service = Service(name, process, log, notify)
    notifications: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "READY=1" not in notifications:
        if process.poll() is not None or time.monotonic() > deadline:
            service.stop(timeout_s=5)
            tail = "\n".join(service.log_lines()[-30:])
            raise RuntimeError(f"{name} did not become ready (exit code {process.returncode}):\n{tail}")
        notifications += _read_notifications(notify, 0.5)
    status = next((n for n in notifications if n.startswith("STATUS=listening on ")), "")
    service.addresses = status.removeprefix("STATUS=listening on ").split()
    return service


def daemon_config(max_running: int, max_queued: int) -> dict[str, Any]:
    """The daemon settings every benchmark daemon runs with (also written to the results)."""
    return {
        "max_running": max_running,
        "max_queued": max_queued,
        "log_level": "WARNING",
        "entry_points": False,
        "drain_grace_s": 5,
        "tasks": dict(BENCH_TASKS),
    }


def _toml(config: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f'"{v}"' if isinstance(v, str) else str(v)

    tables = {key: v for key, v in config.items() if isinstance(v, dict)}  # [tasks], and [sandbox] if set
    lines = [f"{key} = {value(v)}" for key, v in config.items() if key not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{key} = {value(v)}" for key, v in table.items())]
    return "\n".join(lines) + "\n"


def start_daemon(directory: Path, config: dict[str, Any]) -> Service:
    """`python -m task_runner.server` with the benchmark's tasks, on a unix socket and a loopback port."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.toml"
    config_path.write_text(_toml(config))
    argv = [
        sys.executable, "-m", "task_runner.server", "--config", str(config_path),
        "--listen", f"unix:{directory / 'daemon.sock'}", "--listen", "127.0.0.1:0",
    ]
    daemon = start_service("daemon", argv, directory)
    forkserver = forkserver_of(daemon.pid)
    if forkserver is not None:
        daemon.companions.append(forkserver)
    daemon.facts["task_cgroups"] = task_cgroup_base(daemon.pid)
    daemon.facts["forkserver_pid"] = forkserver.pid if forkserver is not None else None
    return daemon


def start_echo(directory: Path) -> Service:
    argv = [
        sys.executable, "-m", "bench.echo_server",
        "--listen", f"unix:{directory / 'echo.sock'}", "--listen", "127.0.0.1:0",
    ]
    return start_service("echo", argv, directory)


def forkserver_of(daemon_pid: int) -> psutil.Process | None:
    """The daemon's fork server: its child whose command line names the fork server module."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(daemon_pid).children():
            with contextlib.suppress(psutil.Error):
                if any(FORKSERVER_MODULE in part for part in child.cmdline()):
                    return child
    return None


def task_cgroup_base(daemon_pid: int) -> str | None:
    """The cgroup v2 directory the daemon makes task cgroups in, if it made one (else it uses process groups)."""
    own = own_cgroup(daemon_pid)
    if own is None:
        return None
    base = os.path.join(own, f"task-runner-{daemon_pid}")
    return base if os.path.isdir(base) else None


def footprint(daemon_pid: int) -> dict[str, float]:
    """The daemon's RSS (MiB), threads, descriptors and CPU time; the same of its fork server and reaped tasks."""
    daemon = psutil.Process(daemon_pid)
    cpu = daemon.cpu_times()
    figures: dict[str, float] = {
        "rss_mib": daemon.memory_info().rss / MIB,
        "threads": daemon.num_threads(),
        "fds": daemon.num_fds(),
        "cpu_s": cpu.user + cpu.system,
    }
    forkserver = forkserver_of(daemon_pid)
    if forkserver is not None:
        with contextlib.suppress(psutil.Error):
            cpu = forkserver.cpu_times()
            figures["forkserver_rss_mib"] = forkserver.memory_info().rss / MIB
            figures["forkserver_fds"] = forkserver.num_fds()
            figures["forkserver_children"] = len(forkserver.children())
            figures["forkserver_cpu_s"] = cpu.user + cpu.system
            # The task processes it reaped (wait4 adds their usage to the fork server's children times).
            figures["tasks_cpu_s"] = cpu.children_user + cpu.children_system
    return figures


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until none of `pids` exists, not even as a zombie; return those still there at the timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
            try:
                select.select([fd], [], [], max(0.0, deadline - time.monotonic()))  # readable once it exits
            finally:
                os.close(fd)
    # It has exited; its parent reaps it moments later.
    while (left := [pid for pid in pids if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.002)
    return left


def kill_own(pids: Iterable[int], since: float) -> list[int]:
    """SIGKILL those of `pids` that still run and were created after `since` (so are ours); return them."""
    killed = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() >= since - 1:
                process.kill()
                killed.append(pid)
    return killed


def stop_descendants(timeout_s: float = 5.0) -> list[str]:
    """The last safety net: end whatever process we started that is still running; describe each."""
    me = psutil.Process()
    left = []
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's helper: it ends by itself when we exit
            left.append(child)
    described = []
    for child in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
            child.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return described

"""Fixtures: a real daemon, started as a subprocess, talked to over real gRPC; and the tiers of tests.

A daemon is ready when it sends READY=1 to the NOTIFY_SOCKET we give it (the systemd notify
protocol), so the fixtures wait on an event, not on a sleep. Each test is marked with its tier by
what it uses (`unit`, `inprocess`, `daemon`; see `tier_of`), and a run ends with each tier's count
and time.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from task_runner.client import Client
from tests.inprocess import InProcessDaemon, with_harness_writable
from tests.tasks import faults

REPO = Path(__file__).resolve().parent.parent
FAULTS = "tests.tasks.faults"
# Every public function of tests/tasks/faults.py is registered under its own name.
TEST_TASKS = sorted(
    name for name, obj in vars(faults).items()
    if inspect.isfunction(obj) and obj.__module__ == faults.__name__ and not name.startswith("_")
)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    unix: str
    tcp: str
    log: Path
    notifications: list[str] = field(default_factory=list)
    notify_sock: socket.socket | None = None

    @property
    def target(self) -> str:
        return self.unix

    def client(self) -> Client:
        return Client(self.unix)

    def read_notifications(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for notify messages; returns the new ones."""
        assert self.notify_sock is not None
        new: list[str] = []
        ready, _, _ = select.select([self.notify_sock], [], [], timeout)
        while ready:
            new += self.notify_sock.recv(4096).decode().split("\n")
            ready, _, _ = select.select([self.notify_sock], [], [], 0)
        self.notifications += new
        return new

    def wait_for(self, state: str, timeout: float = 20) -> bool:
        """Wait for the daemon to send `state` (e.g. "STOPPING=1", "STATUS=reloaded") to its notify
        socket, among the messages not read yet."""
        deadline = time.monotonic() + timeout
        while state not in self.read_notifications(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                return False
        return True

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.notify_sock is not None:
                self.notify_sock.close()


_STARTED: list[Daemon] = []  # every daemon a test started: none may outlive its test (see _no_daemon_left)


@pytest.fixture(autouse=True)
def _no_daemon_left() -> Iterator[None]:
    """A test that fails before it stops its daemon leaves none running: it is stopped (killed if need be) here."""
    before = len(_STARTED)
    yield
    for daemon in _STARTED[before:]:
        if daemon.process.poll() is None:
            daemon.stop(timeout=10)
    del _STARTED[before:]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Session fixtures' daemons too, whatever ended the run."""
    for daemon in _STARTED:
        if daemon.process.poll() is None:
            daemon.stop(timeout=10)


def _unreadable_by_others(path: Path) -> str | None:
    """The first folder on the way to `path` that another uid cannot enter or read, if any."""
    for folder in (*reversed(path.parents), path):
        mode = folder.stat().st_mode
        if not mode & 0o001 or (folder == path and not mode & 0o004):
            return f"{folder} (mode {mode & 0o777:04o})"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """As root the daemon runs tasks under other uids (nobody, uids of their own), which import from this install
    and this checkout: say so at once, in one line, rather than fail deep inside the tests that do."""
    if os.geteuid() != 0:
        return
    import task_runner

    needed = (Path(sys.prefix), Path(task_runner.__file__).resolve().parent, REPO)
    blocked = next((found for path in needed if (found := _unreadable_by_others(path.resolve()))), None)
    if blocked:
        pytest.exit(f"the tests need an install and a checkout other users can read (tasks run as other uids and "
                    f"import from them), but {blocked} is closed to them: clone and create the venv elsewhere "
                    f"(e.g. under /srv or /work), or chmod o+rx it", returncode=4)


@contextlib.contextmanager
def open_directory(prefix: str, mode: int, parent: str | None = None) -> Iterator[Path]:
    """A fresh directory other uids may use (pytest's tmp_path is closed to them), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        path.chmod(mode)
        yield path
    finally:
        shutil.rmtree(path)


def write_config(path: Path, extra: str = "", tasks: list[str] | None = None) -> Path:
    """A config with the test tasks. Tasks may write to the tests' temporary directories (their files are how
    tests watch them from outside), unless `extra` has a [sandbox] table of its own."""
    lines = [with_harness_writable(extra, path), "[tasks]"]
    lines += [f'{name} = "{FAULTS}:{name}"' for name in (TEST_TASKS if tasks is None else tasks)]
    lines.append('broken_import = "tests.tasks.broken_import:never"')
    path.write_text("\n".join(lines) + "\n")
    return path


def start_daemon(directory: Path, config_extra: str = "", env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), python: str = sys.executable, wrap: tuple[str, ...] = ()) -> Daemon:
    """Start `python -m task_runner.server` with the test tasks; return once it is ready. `wrap`: a command
    it runs under (setpriv, to start it as another user: its notify socket is then open to all)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory / "config.toml", config_extra)
    notify_path = directory / "notify"
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify_path))
    if wrap:
        notify_path.chmod(0o777)
    unix = f"unix:{directory / 'daemon.sock'}"
    log = directory / "daemon.log"
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(REPO), **(env or {})}
    if shutil.which("setpriv"):  # SIGTERM to the daemon should this process die unasked (killed, a CI timeout)
        # (after any change of user setpriv makes, which would clear it)
        wrap = ("setpriv", *wrap[1:], "--pdeathsig", "TERM") if wrap[:1] == ("setpriv",) else \
            ("setpriv", "--pdeathsig", "TERM", *wrap)
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [*wrap, python, "-m", "task_runner.server", "--config", str(config),
             "--listen", unix, "--listen", "127.0.0.1:0", *args],
            cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    daemon = Daemon(process, unix, "", log, notify_sock=notify_sock)
    _STARTED.append(daemon)
    deadline = time.monotonic() + 30
    while "READY=1" not in daemon.notifications:
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):  # (killed then)
                daemon.stop(timeout=5)
            raise RuntimeError(f"the daemon did not start:\n{daemon.log_text()}")
        daemon.read_notifications(timeout=0.5)
    status = next(n for n in daemon.notifications if n.startswith("STATUS=listening on"))
    daemon.tcp = re.search(r"127\.0\.0\.1:\d+", status).group(0)  # type: ignore[union-attr]
    return daemon


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by the tests that do not change its configuration."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"), 'cgroup = "off"\n',
                     env={"TASK_RUNNER_TEST_SECRET": "hunter2"})
    yield d
    assert d.stop() == 0, d.log_text()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def required_tool(name: str, package: str) -> str:
    """The path of a program a test needs: skipped here without it, failed in CI (.ci/run installs it)."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def cgroup_v2_writable() -> bool:
    from task_runner.server.sandbox.cgroups import own_cgroup

    own = own_cgroup()
    return own is not None and os.access(own, os.W_OK)


@pytest.fixture(scope="session", params=["off", "auto"], ids=["process-groups", "cgroup-v2"])
def tree_daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon that ends process trees with process groups and the subreaper, or with cgroup v2."""
    if request.param == "auto" and not cgroup_v2_writable():
        message = "no writable cgroup v2 hierarchy on this machine"
        if in_ci():
            pytest.fail(message)  # CI's machines have one: both paths must be tested there
        pytest.skip(message)
    d = start_daemon(tmp_path_factory.mktemp(f"tree-{request.param}"), f'cgroup = "{request.param}"\n')
    d.cgroup_mode = request.param  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of `pids` exists (not even as a zombie); return those still there."""
    deadline = time.monotonic() + timeout
    pids = [pid for pid in pids if pid > 0]  # (0: read_pids found it ended)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
            try:
                select.select([fd], [], [], max(0.0, deadline - time.monotonic()))  # readable once it exits
            finally:
                os.close(fd)
    # It has exited; its parent reaps it moments later.
    while (left := [pid for pid in pids if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Wait for a condition that has no event to wait on (a file written, a process gone)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def read_pids(path: Path) -> list[int]:
    """The pids here of the processes a task recorded (tests/tasks/faults.py `_record`: its pid in its own
    pid namespace, that namespace, its start time); 0 for one that has ended (no process has pid 0), so
    that the count is what the task recorded."""
    if not path.exists():
        return []
    records = [line.split() for line in path.read_text().splitlines() if line.count(" ") == 2]
    found: dict[tuple[str, str, str], int] = {}
    wanted = {tuple(record) for record in records}
    own = os.readlink("/proc/self/ns/pid")
    for entry in os.scandir("/proc") if any(ns != own for _, ns, _ in wanted) else ():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ns = os.readlink(f"/proc/{entry.name}/ns/pid")
                if ns != own:
                    status = Path(f"/proc/{entry.name}/status").read_text()
                    inner = next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:"))
                    found[(inner, ns, _started(entry.name))] = int(entry.name)
    for pid, ns, started in wanted:
        if ns == own:
            with contextlib.suppress(OSError, IndexError):
                if _started(pid) == started:
                    found[(pid, ns, started)] = int(pid)
    return [found.get((pid, ns, started), 0) for pid, ns, started in records]


def _started(pid: str) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def task_processes(forkserver: Any) -> list[Any]:
    """The fork server's task processes: its children but its helpers (the sweeper of a daemon with a uid per
    task, the init maker of one with pid namespaces)."""
    import psutil

    found = []
    for child in forkserver.children():
        with contextlib.suppress(psutil.Error, OSError):
            command = " ".join(child.cmdline())
            if not any(f"task_runner.server.forkserver.{helper}" in command for helper in ("sweeper", "inits")):
                found.append(child)
    return found


def wait_for_spares(daemon: Daemon, spares: int = 4, timeout: float = 10) -> bool:
    """Wait until the fork server holds just its spares (each costs the daemon 3 descriptors)."""
    import psutil

    def settled() -> bool:
        try:
            zygote = next(p for p in psutil.Process(daemon.process.pid).children()
                          if "forkserver" in " ".join(p.cmdline()))
            return len(task_processes(zygote)) == spares
        except (psutil.Error, StopIteration):
            return False

    return wait_until(settled, timeout)


# The tiers, fastest first: a test that starts no daemon, one that embeds one (tests/inprocess.py), one that
# starts one as a subprocess. `-m unit` runs the first alone.
TIERS = ("unit", "inprocess", "daemon")
# What starts a daemon as a subprocess without start_daemon: its module run (`-m task_runner.server`) and the
# CLI's subcommand (`task-runner serve`), as the strings a test passes to subprocess.
_DAEMON_ARGUMENTS = frozenset({"task_runner.server", "serve"})
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_tiers: dict[str, str] = {}  # node id -> tier, for the summary
_seconds: dict[str, float] = {}  # node id -> its setup, call and teardown time


def _uses(code: Any, namespace: dict[str, Any], seen: set[Any]) -> set[str]:
    """The tiers `code` reaches, through the functions and classes of the tests it loads (`namespace`: the
    globals it loads them from), the code nested in it and the strings it holds."""
    if code in seen:
        return set()
    seen.add(code)
    found: set[str] = set()
    for constant in code.co_consts:
        if isinstance(constant, str) and constant in _DAEMON_ARGUMENTS:
            found.add("daemon")
        elif inspect.iscode(constant):
            found |= _uses(constant, namespace, seen)
    for instruction in dis.get_instructions(code):
        if instruction.opname not in _LOADS:
            continue
        loaded = namespace.get(instruction.argval)
        if loaded is start_daemon:
            found.add("daemon")
        elif loaded is InProcessDaemon:
            found.add("inprocess")
        elif getattr(loaded, "__module__", "").startswith("tests."):
            for function in _functions(loaded):
                found |= _uses(function.__code__, function.__globals__, seen)
    return found


def _functions(loaded: Any) -> Iterable[Any]:
    """The test helper function itself, or a test helper class's methods (a fixture's object is neither)."""
    if inspect.isfunction(loaded):
        return (loaded,)
    if inspect.isclass(loaded):
        return (member for member in vars(loaded).values() if inspect.isfunction(member))
    return ()


def tier_of(item: pytest.Item) -> str:
    """A test's tier: its own marker if it has one; else `daemon` if it, a fixture it uses or a helper of the
    tests they call starts a daemon subprocess (start_daemon, or `serve` run by hand); else `inprocess` if one
    uses tests/inprocess.py's daemon; else `unit`."""
    marked = next((marker.name for marker in item.iter_markers() if marker.name in TIERS), None)
    if marked is not None:
        return marked
    functions = [getattr(item, "function", None)]
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is not None:
        functions += [definition.func for definitions in fixtures.name2fixturedefs.values()
                      for definition in definitions]
    seen: set[Any] = set()
    found: set[str] = set()
    for function in (inspect.unwrap(function) for function in functions if function is not None):
        if inspect.isfunction(function):
            found |= _uses(function.__code__, function.__globals__, seen)
    return next((tier for tier in reversed(TIERS) if tier in found), "unit")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tiers[item.nodeid] = tier_of(item)
        item.add_marker(tier)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid in _tiers:
        _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Each tier's count and time, of the tests that ran (a session fixture's start counts in its first test)."""
    counts = dict.fromkeys(TIERS, 0)
    seconds = dict.fromkeys(TIERS, 0.0)
    for nodeid, spent in _seconds.items():
        counts[_tiers[nodeid]] += 1
        seconds[_tiers[nodeid]] += spent
    if _seconds:
        terminalreporter.section("tiers")
        for tier in TIERS:
            terminalreporter.write_line(f"{tier:<10} {counts[tier]:>4} tests {seconds[tier]:>8.1f} s")

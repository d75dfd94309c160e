"""The cgroup trees that daemons which are gone left behind: removed whole at the next start, and only theirs.

A daemon makes its tasks' cgroups in `task-runner-PID/gN/sM` under its own cgroup (`cgroup = "auto"`)
or the one configured; a SIGKILLed one leaves that tree, with whatever its tasks made below and any
process still in it. The next daemon to start there kills what is inside and removes the tree,
deepest first; a tree whose daemon still runs is never touched. The daemons here are given a cgroup
of the test's own (below the test process's), so that no other test's daemon cleans up what these
leave for theirs. They need a writable cgroup v2 hierarchy (root, or a delegated one).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from task_runner.client import NO_RETRY, Client, TaskFailed, Unavailable
from task_runner.server.sandbox.cgroups import own_cgroup
from tests.conftest import cgroup_v2_writable, in_ci, read_pids, start_daemon, wait_gone, wait_until

PID_MAX_LIMIT = 1 << 22
_serial = itertools.count()


@pytest.fixture
def parent() -> Iterator[Path]:
    """A cgroup for the test's daemons to make their trees in (their `cgroup` setting), removed after."""
    if not cgroup_v2_writable():
        if in_ci():
            pytest.fail("CI's machines have a writable cgroup v2 hierarchy: the leftovers must be tested there")
        pytest.skip("no writable cgroup v2 hierarchy on this machine")
    own = own_cgroup()
    assert own is not None
    path = Path(own) / f"test-leftovers-{os.getpid()}-{next(_serial)}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_tree(path)  # and whatever a failed test left in it


def dead_pid() -> int:
    """A pid no process has, nor will have during the test: above pid_max, where the kernel allows that."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if pid_max + 2000 <= PID_MAX_LIMIT:
        return pid_max + 1000 + os.getpid() % 1000
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    return reaped.pid


def run_in(cgroup: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A process in `cgroup` from its start, with a child of its own in there too: (it, the child's pid)."""
    cgroup.mkdir(parents=True, exist_ok=True)
    script = f'echo 0 > "{cgroup}/cgroup.procs" && {{ sleep 600 & echo $!; }} && exec sleep 600'
    process = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None
    with process.stdout:
        child = int(process.stdout.readline())  # written once both are in the cgroup
    return process, child


def cgroup_of(pid: int) -> str:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return next(line.split("::", 1)[1].strip() for line in text.splitlines() if line.startswith("0::"))


def remove_tree(path: Path) -> None:
    """Kill what is in a cgroup tree and remove it, deepest first: a test's own clean-up."""
    if not path.exists():
        return
    (path / "cgroup.kill").write_text("1")
    assert wait_until(lambda: "populated 0" in (path / "cgroup.events").read_text(), 10)
    for directory in sorted((d for d, _, _ in os.walk(path)), key=lambda d: -d.count("/")):
        os.rmdir(directory)


def test_a_start_removes_the_trees_of_dead_daemons_whole_and_leaves_a_live_ones(parent: Path, tmp_path: Path) -> None:
    """Two trees of a daemon that is gone, nested three deep below a task cgroup, with processes in
    them: gone after the next start, their processes killed. A tree named after a live process, with a
    process in it: untouched. (The start before this fix removed one level and left the rest.)"""
    dead = parent / f"task-runner-{dead_pid()}"
    for cgroup in ("g1/s1", "g1/s2", "g2/s1"):
        (dead / cgroup).mkdir(parents=True)
    deep, deep_child = run_in(dead / "g1/s2/made-by-a-task/deeper")
    shallow, shallow_child = run_in(dead / "g2/s1")
    owner = subprocess.Popen(["sleep", "600"])  # the "daemon" of the live tree
    live = parent / f"task-runner-{owner.pid}"
    (live / "g1/s1").mkdir(parents=True)
    inside, inside_child = run_in(live / "g1/s2")
    daemon = None
    try:
        daemon = start_daemon(tmp_path / "d", f'cgroup = "{parent}"\n')
        assert not dead.exists(), sorted(str(p) for p in dead.rglob("*") if p.is_dir())
        assert deep.wait(10) == -signal.SIGKILL and shallow.wait(10) == -signal.SIGKILL
        assert wait_gone([deep_child, shallow_child]) == []
        assert f"removed {dead}, left behind by a daemon that is gone (8 cgroups, 4 processes killed)" \
            in daemon.log_text(), daemon.log_text()
        assert (live / "g1/s1").is_dir() and inside.poll() is None and owner.poll() is None
        assert cgroup_of(inside.pid).endswith(f"/{live.name}/g1/s2"), cgroup_of(inside.pid)
        assert cgroup_of(inside_child) == cgroup_of(inside.pid)
        assert str(live) not in daemon.log_text()
        with daemon.client() as client:  # and it serves, in cgroups of its own
            cgroup = client.call("my_cgroup", 5000).result["cgroup"]
            assert f"/task-runner-{daemon.process.pid}/g1/" in cgroup, cgroup
    finally:
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log_text()
        for process in (deep, shallow, inside, owner):
            process.kill()
            process.wait()
        for pid in (deep_child, shallow_child, inside_child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def serves(client: Client) -> bool:
    try:
        return client.call("echo", 5000).outcome
    except Unavailable:
        return False


def test_the_tree_of_a_sigkilled_daemon_is_gone_after_the_next_start(parent: Path, tmp_path: Path) -> None:
    """A daemon SIGKILLed with its fork server while a task runs leaves `task-runner-PID/g1/sN`, the
    task and the spares still in it; the next start ends them and removes the tree whole, so that no
    later start pays for it again. (The start before this fix left `g1` and the tree, and spent a
    second waiting on each.)"""
    first = start_daemon(tmp_path / "first", f'cgroup = "{parent}"\n')
    tree = parent / f"task-runner-{first.process.pid}"
    pidfile = tmp_path / "pids"
    with Client(first.unix, retry=NO_RETRY) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60})
        assert wait_until(lambda: read_pids(pidfile), 20)
        assert (tree / "g1").is_dir() and any((tree / "g1").iterdir())
        forkserver = psutil.Process(first.process.pid).children()
        for process in [first.process, *forkserver]:  # as `systemctl kill -s KILL` or the OOM killer would
            process.kill()
        first.process.wait()
        first.stop()
        with pytest.raises((TaskFailed, Unavailable)):
            running.result(30)
    second = start_daemon(tmp_path / "second", f'cgroup = "{parent}"\n')
    try:
        assert not tree.exists(), sorted(str(p) for p in tree.rglob("*") if p.is_dir())
        assert f"removed {tree}, left behind by a daemon that is gone" in second.log_text(), second.log_text()
        assert wait_gone(read_pids(pidfile)) == []
        with second.client() as client:
            assert wait_until(lambda: serves(client), 20)
    finally:
        assert second.stop() == 0, second.log_text()

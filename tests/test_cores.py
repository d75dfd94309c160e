"""No core dumps by default: a task that crashes leaves no core anywhere, and cannot ask for one.

A core holds the memory of a process that had a request's data (and, in a spare forked from the fork
server, what it inherited). The daemon here is started with its soft RLIMIT_CORE raised to its hard
limit, so that without the task's own limit a crash would leave one; each crash is the task's (or a
program's it runs) after it raised its soft limit as far as the hard one lets it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from task_runner.client import Client, TaskCrashed
from tests.conftest import REPO, open_directory, start_daemon

HOSTILE = "tests.tasks.hostile_secrets"
MIB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")


def config(run_as: str, shared: Path, limits: str = "") -> str:
    user = 'run_as_user = "nobody"\n' if run_as == "nobody" else ""
    tasks = "".join(f'[tasks.{name}]\ntarget = "{HOSTILE}:{name}"\n' for name in ("core_limits", "crash_in"))
    return f'{user}cgroup = "off"\n[limits]\n{limits}[sandbox]\nwritable = ["{shared}"]\n{tasks}'


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every task may write to: where a core would land if a crash could leave one."""
    with open_directory("task-runner-cores-", 0o1777) as path:
        yield path


@contextlib.contextmanager
def cores_allowed() -> Iterator[None]:
    """The daemon started in this block inherits a soft RLIMIT_CORE as high as the hard one."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (before[1], before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)


def cores(*places: Path) -> set[Path]:
    return {path for place in places for path in place.iterdir() if path.name.startswith("core")}


def pattern_writes_files() -> bool:
    """The kernel writes cores to files named by core_pattern (not piped to a program)."""
    with open("/proc/sys/kernel/core_pattern") as f:
        return not f.read().startswith("|")


@pytest.mark.parametrize("run_as", ["root", "nobody"])
def test_a_crashing_task_leaves_no_core_anywhere(tmp_path: Path, shared: Path, run_as: str) -> None:
    """Its RLIMIT_CORE is (0, 0) and cannot be raised; a program it runs that asks for a core and crashes,
    in its private /tmp or in a writable path, leaves none; nor does the task itself crashing with SIGSEGV,
    in its writable path: none there, in the daemon's directory, its working directory or the host's /tmp."""
    places = (shared, REPO, tmp_path, Path("/tmp"))
    before = cores(*places)
    with cores_allowed():
        daemon = start_daemon(tmp_path / "d", config(run_as, shared))
    try:
        with Client(daemon.unix) as client:
            seen = client.call("core_limits", 20_000, {"dirs": ["/tmp", str(shared)]}).result
            with pytest.raises(TaskCrashed) as crashed:
                client.call("crash_in", 20_000, {"dir": str(shared)})
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert seen["limit"] == [0, 0] and seen["raised"] is False, seen
    for directory, crash in seen["crashes"].items():
        assert crash == {"signal": signal.SIGSEGV, "cores": []}, (directory, seen)
    assert crashed.value.signal == signal.SIGSEGV
    assert cores(*places) == before


def test_core_mb_gives_a_task_that_core_limit(tmp_path: Path, shared: Path) -> None:
    """[limits] core_mb = 64: RLIMIT_CORE is 64 MiB, soft and hard; where the kernel writes cores to files, a
    crash leaves one in the writable path (so the test above would have seen one, but for the limit)."""
    with cores_allowed():
        daemon = start_daemon(tmp_path / "d", config("nobody", shared, "core_mb = 64\n"))
    try:
        with Client(daemon.unix) as client:
            seen = client.call("core_limits", 20_000, {"dirs": [str(shared)]}).result
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert seen["limit"] == [64 * MIB, 64 * MIB] and seen["raised"] is False, seen
    assert seen["crashes"][str(shared)]["signal"] == signal.SIGSEGV, seen
    if pattern_writes_files():
        assert seen["crashes"][str(shared)]["cores"], seen

"""Process trees, for the daemon and the fork server alike: list a process's descendants, kill a whole tree at
once (each by a pidfd, so that a reused pid is never hit), list and reap our own children."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from task_runner.server.sandbox.cgroups import TaskCgroups


def tree(root: int) -> list[tuple[int, int]]:
    """(pid, parent) of every descendant of `root`, as /proc shows them now."""
    found: list[tuple[int, int]] = []
    stack = [root]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{tid}/children") as f:
                    for pid in map(int, f.read().split()):
                        found.append((pid, parent))
                        stack.append(pid)
    return found


def kill_descendants(root: int) -> None:
    """SIGKILL every descendant of `root` at once, whatever session or group each is in.

    Each is signalled through a pidfd opened while it is still `parent`'s child, so that a pid
    freed and reused meanwhile is never hit.
    """
    for pid, parent in tree(root):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == parent:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(fd)


def kill_tree(pid: int, cgroups: TaskCgroups | None = None) -> None:
    """SIGKILL a process and its whole tree at once (descendants in sessions of their own included), its
    process group and its cgroup; tolerate those already gone."""
    kill_descendants(pid)
    if cgroups is not None:
        cgroups.kill(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def children() -> set[int]:
    """The pids of this process's children, of all its threads."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


def reap(pids: set[int], timeout: float) -> set[int]:
    """Reap these children as they end, for up to `timeout` seconds (blocking); those still running.

    In whatever order they end: the init of a task's pid namespace ends only once every other
    process of its namespace has been reaped, and that may be one of them, or a child that is not.
    """
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            left.discard(pid)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    return left

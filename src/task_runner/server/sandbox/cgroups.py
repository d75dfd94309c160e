"""One cgroup v2 per task, where a writable (delegated) cgroup v2 subtree is available.

The daemon finds or creates the subtree once (`prepare`); the fork server puts each task
process into its own cgroup as it forks it, ends the whole tree with `cgroup.kill` (which no
setsid() or double fork escapes) and removes the cgroup once it is empty. At each start the
daemon kills and removes the trees that daemons which are gone left behind. Where the memory and
pids controllers are enabled, `memory.max` and `pids.max` carry the task's limits.
Elsewhere the fork server falls back to process groups and subreaper tracking.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time

from task_runner import frames
from task_runner.server.sandbox.libc import write_file

log = logging.getLogger("task_runner.server")
# What a start spends at most on the cgroups of daemons that are gone; the rest waits for the next.
STALE_MAX_CGROUPS = 2000
STALE_MAX_S = 5.0
GENERATION_END_S = 5.0  # the most an ended fork server's cgroups are waited for
KILL_ROUND_S = 0.1  # without cgroup.kill: how long one round of kills by pid is given to empty a tree
PID_MAX_LIMIT = 1 << 22  # the kernel's ceiling for pid_max: a larger number names no process


def own_cgroup(pid: int | str = "self") -> str | None:
    """The directory of a process's (by default this one's) cgroup in the cgroup v2 hierarchy, if mounted."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            path = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mount = next((line.split()[4] for line in f if " - cgroup2 " in line), None)
    except OSError:
        return None
    if path is None or mount is None:
        return None
    return os.path.join(mount, path.lstrip("/"))


def prepare(setting: str) -> str | None:
    """The directory to create task cgroups in, or None to use the fallback.

    The fork server, which creates the task cgroups, runs as the daemon's user; tasks run as
    `run_as_user` and so cannot write their own cgroup's limits.

    Args:
        setting: "off", "auto" (a subtree of this process's own cgroup, if writable) or a path.
    """
    if setting == "off":
        return None
    parent = own_cgroup() if setting == "auto" else setting
    if parent is None or not os.path.isfile(os.path.join(parent, "cgroup.procs")):
        if setting != "auto":
            log.warning("cgroup %s is not a cgroup v2 directory: using process groups instead", setting)
        return None
    _remove_stale(parent)
    base = os.path.join(parent, f"task-runner-{os.getpid()}")
    try:
        os.mkdir(base)
    except OSError as exc:
        if setting != "auto" or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            log.warning("cannot create a cgroup in %s (%s): using process groups instead", parent, exc.strerror)
        return None
    _enable_controllers(parent, base)
    log.info("tasks run in cgroups under %s (controllers: %s)", base, " ".join(controllers(base)) or "none")
    return base


def _remove_stale(parent: str) -> None:
    """Kill and remove, whole, the cgroup trees of daemons that are gone: a SIGKILLed daemon leaves
    `task-runner-PID/gN/sM` (and whatever its tasks made below), and a tree left there would cost
    every later start its time again.

    Bounded: at most STALE_MAX_CGROUPS cgroups and STALE_MAX_S seconds a start; what is left then
    waits for the next start. A tree is touched only if the daemon named in it is gone (a pid of
    this pid namespace that no process has) and every process in it is one this namespace sees.
    """
    began = time.monotonic()
    deadline = began + STALE_MAX_S
    try:
        stale = [entry.path for entry in os.scandir(parent) if _of_a_dead_daemon(entry)]
    except OSError as exc:
        log.warning("cannot look for cgroups left by daemons that are gone in %s: %s", parent, exc.strerror)
        return
    budget, killed, trees = STALE_MAX_CGROUPS, 0, 0
    for number, path in enumerate(stale):
        if budget <= 0 or time.monotonic() >= deadline:
            log.warning("%d cgroup trees of daemons that are gone are left in %s for the next start (at most %d "
                        "cgroups and %.0f s a start)", len(stale) - number, parent, STALE_MAX_CGROUPS, STALE_MAX_S)
            break
        removed, ended = _remove_tree(path, deadline, budget, "left behind by a daemon that is gone")
        budget -= removed
        killed += ended
        trees += removed > 0
    if trees:
        log.info("removed %d cgroups in %d trees of daemons that are gone (%d processes killed) in %.2f s",
                 STALE_MAX_CGROUPS - budget, trees, killed, time.monotonic() - began)


def _of_a_dead_daemon(entry: os.DirEntry[str]) -> bool:
    """Whether a directory is a daemon's cgroup tree, `task-runner-PID`, whose daemon is gone."""
    pid = entry.name.removeprefix("task-runner-")
    if pid == entry.name or not pid.isdigit() or not 0 < int(pid) <= PID_MAX_LIMIT:
        return False
    return entry.is_dir(follow_symlinks=False) and not pid_alive(int(pid))


def _remove_tree(path: str, deadline: float, budget: int, why: str | None) -> tuple[int, int]:
    """Kill everything in a cgroup tree, then remove its cgroups, deepest first; (cgroups removed,
    processes killed). Up to `budget` cgroups, until `deadline` (monotonic); errors are logged, and
    what was removed too, saying `why`, if given."""
    tree, truncated = _subtree(path, budget)
    procs = [pid for cgroup in tree for pid in _procs(cgroup)]
    if 0 in procs:  # a process of another pid namespace: "its daemon is gone" means nothing here
        log.warning("leaving %s alone: it holds processes of another pid namespace", path)
        return 0, 0
    if procs and not _end_processes(path, tree, deadline):
        log.warning("cannot remove %s: processes are still in it; left for the next start", path)
        return 0, len(procs)
    removed = 0
    for cgroup in reversed(tree):  # children before their parents
        try:
            os.rmdir(cgroup)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not (truncated and exc.errno in (errno.EBUSY, errno.ENOTEMPTY)):  # its children wait their turn
                log.warning("cannot remove the cgroup %s: %s", cgroup, exc.strerror)
    if removed and why:
        log.info("removed %s, %s (%d cgroups, %d processes killed)%s", path, why, removed, len(procs),
                 "; the rest waits for the next start" if truncated else "")
    return removed, len(procs)


def _subtree(path: str, limit: int) -> tuple[list[str], bool]:
    """A cgroup and those below it, each after its parent, at most `limit` of them; and whether
    some were left out."""
    found: list[str] = []
    pending = [path]
    while pending and len(found) < limit:
        current = pending.pop()
        found.append(current)
        try:
            with os.scandir(current) as entries:
                pending += [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot list the cgroup %s: %s", current, exc.strerror)
    return found, bool(pending)


def _procs(cgroup: str) -> list[int]:
    """The processes in one cgroup (0 for each one this pid namespace cannot see)."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _end_processes(path: str, tree: list[str], deadline: float) -> bool:
    """SIGKILL every process in a cgroup tree; whether the tree was empty by `deadline`.

    `cgroup.kill` (Linux 5.14) ends the whole tree at once, with nothing escaping it. Before it,
    the tree is frozen where the kernel can (5.2), so that nothing forks while it is killed pid
    by pid, and killed again until it is empty.
    """
    try:
        write_file(os.path.join(path, "cgroup.kill"), "1")
    except OSError:
        pass
    else:
        return _wait_unpopulated(path, deadline)
    with contextlib.suppress(OSError):
        write_file(os.path.join(path, "cgroup.freeze"), "1")  # a frozen process still dies of SIGKILL
    while True:
        for pid in (pid for cgroup in tree for pid in _procs(cgroup)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as exc:
                log.warning("cannot kill process %d in the cgroup %s: %s", pid, path, exc.strerror)
        if _wait_unpopulated(path, min(deadline, time.monotonic() + KILL_ROUND_S)):
            return True
        if time.monotonic() >= deadline:
            return False


def _wait_unpopulated(path: str, deadline: float) -> bool:
    """Wait until no process is left in a cgroup or below it, until `deadline` (monotonic); whether
    none is. The kernel reports each change of `cgroup.events` to poll() as POLLPRI."""
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while b"populated 0" not in os.pread(fd, 4096, 0):  # reading re-arms the notification
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(int(remaining * 1e3) + 1)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _enable_controllers(parent: str, base: str) -> None:
    """Make memory and pids available to the task cgroups, where the parent has them to give.

    cgroup v2 lets a non-root cgroup hand controllers to its children only while no process
    lives in it. Under systemd (Delegate=yes) the daemon itself lives in the service's cgroup,
    so it first moves itself into a leaf, `daemon`, beside the task cgroups.
    """
    available = set(controllers(parent, "cgroup.controllers")) & {"memory", "pids"}
    if not available:
        return
    if not _enable(parent, available):
        try:
            leaf = os.path.join(parent, "daemon")
            os.makedirs(leaf, exist_ok=True)
            write_file(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        except OSError as exc:
            log.warning("cannot move the daemon into a leaf cgroup (%s): no memory/pids limits by cgroup",
                        exc.strerror)
            return
        _enable(parent, available)
    _enable(base, available)


def _enable(directory: str, wanted: set[str]) -> bool:
    """Enable controllers for a cgroup's children; whether all were enabled."""
    try:
        write_file(os.path.join(directory, "cgroup.subtree_control"), " ".join(f"+{c}" for c in sorted(wanted)))
    except OSError:
        return False
    return True


def controllers(directory: str, name: str = "cgroup.subtree_control") -> list[str]:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().split()
    except OSError:
        return []


def remove_base(base: str | None) -> None:
    if base is not None:
        with contextlib.suppress(OSError):
            os.rmdir(base)


def new_generation(base: str | None, number: int) -> str | None:
    """A cgroup for one fork server's task cgroups, `<base>/g<number>`; None where there are no cgroups.

    Each fork server has its own, so that one that dies leaves nothing in the way of the next,
    and all its tasks can be ended at once with the generation's `cgroup.kill`.
    """
    if base is None:
        return None
    path = os.path.join(base, f"g{number}")
    try:
        os.mkdir(path)
    except OSError as exc:
        log.warning("cannot create the cgroup %s (%s): tasks run without cgroups", path, exc.strerror)
        return None
    wanted = set(controllers(base)) & {"memory", "pids"}
    if wanted:
        _enable(path, wanted)
    return path


def end_generation(path: str | None) -> None:
    """Kill everything left in a fork server's generation cgroup, then remove it (blocking, briefly)."""
    if path is not None:
        _remove_tree(path, time.monotonic() + GENERATION_END_S, STALE_MAX_CGROUPS, None)


def _kill(path: str) -> None:
    with contextlib.suppress(OSError):
        write_file(os.path.join(path, "cgroup.kill"), "1")


class TaskCgroups:
    """The fork server's side: a cgroup per task process, emptied (killed) after it and reused.

    Creating and removing a cgroup costs the kernel far more than moving a process into an
    existing one, so a cgroup found empty once its task is reaped goes back to a free list.
    """

    MAX_FREE = 64

    def __init__(self, base: str | None) -> None:
        self.base = base
        self._paths: dict[int, str] = {}  # task process -> its cgroup
        self._serial = 0
        self._free: list[str] = []  # empty, ready for the next task
        self._pending: set[str] = set()  # killed, not yet empty
        self._memory = base is not None and os.path.exists(os.path.join(base, "memory.events"))
        self._oom_before: dict[int, int] = {}

    def add(self, pid: int) -> str | None:
        """Put a task process, just forked, into a cgroup of its own; its path, or None."""
        if self.base is None:
            return None
        if self._free:
            path = self._free.pop()
        else:
            self._serial += 1
            path = os.path.join(self.base, f"s{self._serial}")
            try:
                os.mkdir(path)
            except OSError:
                return None  # this task goes without: process groups and the subreaper still hold it
        try:
            write_file(os.path.join(path, "cgroup.procs"), str(pid))
        except OSError:
            self._remove(path)
            return None
        self._paths[pid] = path
        if self._memory:
            self._oom_before[pid] = _oom_kills(path)
        return path

    def kill(self, pid: int) -> None:
        path = self._paths.get(pid)
        if path is not None:
            _kill(path)

    def oom_killed(self, pid: int) -> bool:
        """Whether the kernel killed something in the task's cgroup for want of memory."""
        path = self._paths.get(pid)
        return path is not None and self._memory and _oom_kills(path) > self._oom_before.get(pid, 0)

    def release(self, pid: int) -> None:
        """The task process was reaped: kill whatever is left in its cgroup; reuse it once empty."""
        path = self._paths.pop(pid, None)
        self._oom_before.pop(pid, None)
        if path is None:
            return
        if _populated(path):
            _kill(path)
            self._pending.add(path)
        elif len(self._free) < self.MAX_FREE:
            self._free.append(path)
        else:
            self._remove(path)

    def remove_emptied(self) -> None:
        """Remove the cgroups killed with something left in them whose last processes are gone."""
        for path in list(self._pending):
            if not _populated(path):
                self._pending.discard(path)
                self._remove(path)

    def close(self) -> None:
        self.remove_emptied()
        for path in self._free:
            self._remove(path)
        self._free.clear()

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def _populated(path: str) -> bool:
    try:
        return "populated 1" in _read(os.path.join(path, "cgroup.events"))
    except OSError:
        return False


def _oom_kills(path: str) -> int:
    try:
        text = _read(os.path.join(path, "memory.events"))
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)


def limit(path: str, limits: frames.Limits) -> frames.Limits:
    """Give a task's cgroup its memory.max and pids.max ("max" for none), where those controllers are
    enabled; returns the limits its process still sets itself (none for processes, which pids.max binds
    for the whole tree better than the per-user RLIMIT_NPROC).

    Cgroups are reused, so a limit is always written, to undo the previous task's.
    """
    for name, value in (("memory.max", limits.memory), ("pids.max", limits.processes)):
        target = os.path.join(path, name)
        if os.path.exists(target):  # the controller is enabled here
            write_file(target, "max" if value == frames.NO_LIMIT else str(value))
            if name == "pids.max" and value != frames.NO_LIMIT:
                limits = limits._replace(processes=frames.BY_CGROUP)
    return limits

"""A uid of its own for every task process, so that no task can signal, trace or read another.

When the daemon runs as root with `run_as_user`, each task process (and each spare, while it
waits) runs under a uid of its own, taken from a block of unnamed uids the daemon claims at
start, with `run_as_user`'s group and no other. Processes of different uids cannot signal,
ptrace or read each other's memory, and a 0700 directory of one uid is closed to the others.

A claim is a file named after its range in CLAIMS_DIR, a directory only root may enter, locked
(flock) by the daemon for its life: the kernel drops the lock when the daemon dies, however it
dies. Claims are made under one lock on that directory, so two daemons on one machine never hold
overlapping uids, and no task (whatever its uid) can take, block or release a claim: it cannot
open a file there. The pool is the daemon's one record of which uids are out, and to which fork
server: a uid goes back to it only once no process of that uid is left on the machine (the fork
server asks the kernel, see task_runner.server.forkserver.uidledger), and is handed out again only after every
other free uid of the block (round robin).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import pwd
import signal
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

log = logging.getLogger("task_runner.server")

AUTO_FIRST = 0x7000_0000  # systemd leaves 0x70000000-0x7FFDFFFF unused (systemd.io/UIDS-GIDS)
AUTO_BLOCK = 4096
AUTO_BLOCKS = 4096  # up to 0x71000000
# Shared by every daemon of the machine. A daemon that runs as a user of its own with CAP_SETUID and CAP_SETGID
# (the systemd unit's) is given one it owns, through TASK_RUNNER_UID_CLAIMS (every daemon must share one).
CLAIMS_DIR = os.environ.get("TASK_RUNNER_UID_CLAIMS", "/run/isolated-task-runner/uids")


class UidError(RuntimeError):
    """No block of uids can be claimed as configured; the message says why and what to change."""


class Claim(NamedTuple):
    """A range of uids a live daemon holds."""

    first: int
    last: int
    pid: int  # the daemon that holds it (0: not known)

    def overlaps(self, first: int, last: int) -> bool:
        return self.first <= last and first <= self.last


class UidPool:
    """The uids of a claimed block, handed out round robin, and who has each that is out; `lock` is the open,
    locked claim file (-1: none)."""

    def __init__(self, first: int, last: int, lock: int) -> None:
        self.first, self.last = first, last
        self._lock = lock
        self._free = collections.deque(range(first, last + 1))
        # Each uid out -> who has it (a fork server's client): asked for, or of processes not yet gone.
        self._out: dict[int, object] = {}

    def __len__(self) -> int:
        return self.last - self.first + 1

    def take(self, holder: object) -> int:
        """A uid no process has, now `holder`'s.

        Raises:
            UidError: if every uid of the block is in use (the block is too small for the load).
        """
        if not self._free:
            raise UidError(f"all {len(self)} task uids {self.first}-{self.last} are in use")
        uid = self._free.popleft()
        self._out[uid] = holder
        return uid

    def give_back(self, uid: int, holder: object) -> None:
        """No process of `holder`'s `uid` is left: it may serve again, last of all. A uid `holder` does not
        have (never, or no longer) stays where it is."""
        if uid in self._out and self._out[uid] is holder:
            del self._out[uid]
            self._free.append(uid)

    def held_by(self, holder: object) -> set[int]:
        """The uids `holder` has."""
        return {uid for uid, who in self._out.items() if who is holder}

    def close(self) -> None:
        """Release the claim (the file goes; the lock with the descriptor)."""
        if self._lock < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(CLAIMS_DIR, _name(self.first, self.last)))
        os.close(self._lock)
        self._lock = -1


def parse_range(setting: str) -> tuple[int, int]:
    """"FIRST-LAST" as two uids.

    Raises:
        ValueError: if `setting` is not of that form, or LAST is below FIRST.
    """
    first, sep, last = setting.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"{setting!r} is not \"auto\", \"off\" or a range \"FIRST-LAST\"")
    low, high = int(first), int(last)
    if not 0 < low <= high < 2**31 - 1:
        raise ValueError(f"{setting!r}: the range must be within 1-{2**31 - 2}, FIRST first")
    return low, high


def claim(setting: str, needed: int, directory: str = CLAIMS_DIR) -> UidPool | None:
    """Claim a block of task uids: "auto" (the first free block of 4096 from 0x70000000), "off"
    (None: every task runs as run_as_user itself) or "FIRST-LAST".

    Args:
        setting: the `task_uids` setting.
        needed: how many task processes may live at once (running, spares, just ended).
        directory: where claims are kept (root's alone).

    Raises:
        UidError: if no block can be claimed, naming what to change (and the daemon that holds it).
    """
    if setting == "off":
        return None
    named = sorted(entry.pw_uid for entry in pwd.getpwall())
    if setting != "auto":
        first, last = parse_range(setting)
        if last - first + 1 < 2 * needed:
            raise UidError(f"task_uids {setting!r} holds {last - first + 1} uids; {needed} task processes may "
                           f"live at once, so give it at least {2 * needed}")
        clash = [uid for uid in named if first <= uid <= last]
        if clash:
            raise UidError(f"task_uids {setting!r} includes uids of named users "
                           f"({', '.join(map(str, clash[:5]))}): give it a range no account uses")
    elif needed > AUTO_BLOCK // 2:
        raise UidError(f"{needed} task processes may live at once: set task_uids to a range of at least "
                       f"{2 * needed} uids")
    with _claims_locked(directory) as dirfd:
        held = list(_live_claims(dirfd))
        if setting == "auto":
            first, last = _free_block(held, named)
        else:
            holder = next((c for c in held if c.overlaps(first, last)), None)
            if holder is not None:
                raise UidError(f"task_uids {setting!r} overlaps uids {holder.first}-{holder.last}, claimed by "
                               f"{_who(holder.pid)}: give each daemon a range of its own")
        lock = _hold(dirfd, first, last)
    return _claimed(first, last, lock)


def _who(pid: int) -> str:
    return f"the daemon with pid {pid}" if pid else "another daemon"


def _free_block(held: list[Claim], named: list[int]) -> tuple[int, int]:
    for block in range(AUTO_BLOCKS):
        first = AUTO_FIRST + block * AUTO_BLOCK
        last = first + AUTO_BLOCK - 1
        if not any(first <= uid <= last for uid in named) and not any(c.overlaps(first, last) for c in held):
            return first, last
    holders = ", ".join(sorted({str(c.pid) for c in held}))
    raise UidError("no free block of task uids from 0x70000000 (daemons holding blocks: pids "
                   f"{holders or 'none'}): set task_uids to a range of unused uids")


@contextlib.contextmanager
def _claims_locked(directory: str) -> Iterator[int]:
    """The claims directory (made ours alone if need be: root's, or the unit's user's), locked against other
    daemons' claims."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UidError(f"cannot open {directory}, where task uid claims are kept: {exc.strerror or exc}") from None
    try:
        info = os.fstat(dirfd)
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IXGRP | stat.S_IXOTH):
            whose = "root's" if os.geteuid() == 0 else f"uid {os.geteuid()}'s (the daemon's)"
            raise UidError(f"{directory} must be {whose} alone (mode 0700) so that no task can touch a claim: "
                           f"it is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}")
        fcntl.flock(dirfd, fcntl.LOCK_EX)  # released with the descriptor
        yield dirfd
    finally:
        os.close(dirfd)


def _name(first: int, last: int) -> str:
    return f"{first}-{last}"


def _live_claims(dirfd: int) -> Iterable[Claim]:
    """The claims of live daemons; those whose daemon died (no lock on them) are removed."""
    for name in os.listdir(dirfd):
        try:
            first, last = parse_range(name)
        except ValueError:
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                yield Claim(first, last, int(text) if text.isdigit() else 0)
            else:  # nobody holds it: its daemon is gone
                os.unlink(name, dir_fd=dirfd)
        finally:
            os.close(fd)


def _hold(dirfd: int, first: int, last: int) -> int:
    name = _name(first, last)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _claimed(first: int, last: int, lock: int) -> UidPool:
    killed = kill_leftovers(range(first, last + 1))
    if killed:
        log.warning("killed %d processes left running under task uids %d-%d by a daemon that is gone",
                    killed, first, last)
    log.info("each task runs under a uid of its own, from %d-%d", first, last)
    return UidPool(first, last, lock)


def kill_leftovers(uids: range | set[int]) -> int:
    """Kill every process running under one of these uids, left by a daemon or a fork server that is gone (they
    belong to no live task); the count killed.

    Again until none is found: one may fork between the look and the kill. A daemon without CAP_KILL (the
    systemd unit's) kills a uid's processes from a child that takes that uid, which may signal its own.
    """
    killed = 0
    for _ in range(100):
        found = 0
        refused: set[int] = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, StopIteration), open(f"/proc/{entry.name}/status") as f:
                ids = [int(uid) for uid in next(line for line in f if line.startswith("Uid:")).split()[1:]]
                if any(uid in uids for uid in ids):
                    found += 1
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                    except PermissionError:
                        refused.add(next(uid for uid in ids if uid in uids))
        for uid in refused:
            _kill_all_as(uid)
        if not found:
            break
        killed += found
    return killed


def _kill_all_as(uid: int) -> None:
    """kill(-1, SIGKILL) as `uid`: every process of that uid (and no other) dies. Forked before any thread."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

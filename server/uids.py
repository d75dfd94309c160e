"""A uid of its own for every task process, so that no task can signal, trace or read another.

When the daemon runs as root with `run_as_user`, each task process (and each spare, while it
waits) runs under a uid of its own, taken from a block of unnamed uids the daemon claims at
start, with `run_as_user`'s group and no other. Processes of different uids cannot signal,
ptrace or read each other's memory, and a 0700 directory of one uid is closed to the others.

A block is claimed by binding an abstract unix socket named after it, held for the daemon's
life, so two daemons on one machine never share a block; the kernel releases it when the daemon
dies, however it dies. A uid goes back to the pool once its process is reaped and its tree
killed, and is handed out again only after every other free uid of the block (round robin).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pwd
import signal
import socket

log = logging.getLogger("task_runner.server")

AUTO_FIRST = 0x7000_0000  # systemd leaves 0x70000000-0x7FFDFFFF unused (systemd.io/UIDS-GIDS)
AUTO_BLOCK = 4096
AUTO_BLOCKS = 4096  # up to 0x71000000


class UidError(RuntimeError):
    """No block of uids can be claimed as configured; the message says why and what to change."""


class UidPool:
    """The uids of a claimed block, handed out round robin; `lock` holds the claim."""

    def __init__(self, first: int, last: int, lock: socket.socket) -> None:
        self.first, self.last = first, last
        self._lock = lock
        self._free = collections.deque(range(first, last + 1))
        self._taken: set[int] = set()

    def __len__(self) -> int:
        return self.last - self.first + 1

    def take(self) -> int:
        """A uid no live process of ours has.

        Raises:
            UidError: if every uid of the block is in use (the block is too small for the load).
        """
        if not self._free:
            raise UidError(f"all {len(self)} task uids {self.first}-{self.last} are in use")
        uid = self._free.popleft()
        self._taken.add(uid)
        return uid

    def give_back(self, uid: int) -> None:
        """Its process was reaped and its tree killed: the uid may serve again, last of all."""
        if uid in self._taken:
            self._taken.discard(uid)
            self._free.append(uid)

    def close(self) -> None:
        self._lock.close()


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


def claim(setting: str, needed: int) -> UidPool | None:
    """Claim a block of task uids: "auto" (the first free block of 4096 from 0x70000000), "off"
    (None: every task runs as run_as_user itself) or "FIRST-LAST".

    Args:
        setting: the `task_uids` setting.
        needed: how many task processes may live at once (running, spares, just ended).

    Raises:
        UidError: if no block can be claimed, naming what to change.
    """
    if setting == "off":
        return None
    named = {entry.pw_uid for entry in pwd.getpwall()}
    if setting == "auto":
        if needed > AUTO_BLOCK // 2:
            raise UidError(f"{needed} task processes may live at once: set task_uids to a range of at least "
                           f"{2 * needed} uids")
        for block in range(AUTO_BLOCKS):
            first = AUTO_FIRST + block * AUTO_BLOCK
            last = first + AUTO_BLOCK - 1
            if any(first <= uid <= last for uid in named):
                continue
            lock = _lock(first, last)
            if lock is not None:
                return _claimed(first, last, lock)
        raise UidError("no free block of task uids from 0x70000000: set task_uids to a range of unused uids")
    first, last = parse_range(setting)
    if last - first + 1 < 2 * needed:
        raise UidError(f"task_uids {setting!r} holds {last - first + 1} uids; {needed} task processes may live "
                       f"at once, so give it at least {2 * needed}")
    clash = sorted(uid for uid in named if first <= uid <= last)
    if clash:
        raise UidError(f"task_uids {setting!r} includes uids of named users ({', '.join(map(str, clash[:5]))}): "
                       "give it a range no account uses")
    lock = _lock(first, last)
    if lock is None:
        raise UidError(f"task_uids {setting!r} is in use by another daemon on this machine: give each its own")
    return _claimed(first, last, lock)


def _lock(first: int, last: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0isolated-task-runner/uids/{first}-{last}")
    except OSError:
        sock.close()
        return None
    return sock


def _claimed(first: int, last: int, lock: socket.socket) -> UidPool:
    killed = _kill_leftovers(first, last)
    if killed:
        log.warning("killed %d processes left running under task uids %d-%d by a daemon that is gone",
                    killed, first, last)
    log.info("each task runs under a uid of its own, from %d-%d", first, last)
    return UidPool(first, last, lock)


def _kill_leftovers(first: int, last: int) -> int:
    """Kill every process running under a uid of the block: no daemon holds it, so they are leftovers.

    Again until none is found: one may fork between the look and the kill.
    """
    killed = 0
    for _ in range(100):
        found = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, StopIteration), open(f"/proc/{entry.name}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
                if any(first <= int(uid) <= last for uid in uids):
                    os.kill(int(entry.name), signal.SIGKILL)
                    found += 1
        if not found:
            break
        killed += found
    return killed

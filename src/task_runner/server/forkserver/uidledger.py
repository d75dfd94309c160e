"""The fork server's ledger of task uids: each uid's life there, from its task process to its release.

A uid the daemon sends with a spare is given to the task process forked for it; once that process
is reaped, what it left may still run under the uid, so the uid is not released until the fork
server knows nothing of it is left: at once (nothing of the task's tree came to it), once its pid
namespace is gone, or once the sweeper (task_runner.server.forkserver.sweeper) answers CLEAN. A sweeper that
answers LEFT is asked again, back to back SWEEPS_AT_ONCE times, then at growing intervals (a process
stuck in the kernel dies when it leaves it). A released uid leaves the ledger: the daemon's pool
(task_runner.server.uids) has it again. Nothing here does any I/O, so it is tested alone.
"""

from __future__ import annotations

from typing import NamedTuple

SWEEPS_AT_ONCE = 8  # sweeps of one uid back to back; then at growing intervals (a process stuck in the kernel)
SWEEP_BACKOFF_S = (0.01, 1.0)  # the first interval, doubled each sweep, and the longest

# Where a uid is in its life here (a uid in none of them is not the fork server's).
GIVEN = "given"  # a live task process has it
REAPED = "reaped"  # its process is reaped; what it left may live (its pid namespace ending, or not yet looked at)
SWEEP_DUE = "sweep due"  # what it left must be killed and counted by the sweeper, at `not_before` or later
SWEEPING = "sweeping"  # the sweeper was asked about it and has not answered yet


class UidStateError(RuntimeError):
    """A uid was moved where its state forbids (given twice, released before its sweep said CLEAN, ...)."""


class _Uid(NamedTuple):
    state: str
    pid: int = 0  # its task process, while GIVEN
    sweeps: int = 0  # LEFT answers so far
    not_before: float = 0.0  # when its next sweep may be asked, while SWEEP_DUE


class UidLedger:
    """Every task uid the fork server has, and where each is in its life; `sweep_at`, when a sweep waits."""

    def __init__(self) -> None:
        self._uids: dict[int, _Uid] = {}
        self._by_pid: dict[int, int] = {}  # the GIVEN uids by their task process (an index of `_uids`)
        self.sweep_at: float | None = None  # when the next sweep is due, as `due` last saw (None: none waits)

    def __contains__(self, uid: object) -> bool:
        return uid in self._uids

    def __len__(self) -> int:
        return len(self._uids)

    def state(self, uid: int) -> str | None:
        """Where `uid` is in its life here; None once released (or never given)."""
        entry = self._uids.get(uid)
        return entry.state if entry is not None else None

    def give(self, uid: int, pid: int) -> None:
        """`uid` is the task process `pid`'s.

        Raises:
            UidStateError: if the fork server has `uid` already (the daemon gave it twice), or `pid` has one.
        """
        if uid in self._uids:
            raise UidStateError(f"uid {uid} given to task process {pid} while {self._uids[uid].state}")
        if pid in self._by_pid:
            raise UidStateError(f"task process {pid} given uid {uid} while it has uid {self._by_pid[pid]}")
        self._uids[uid] = _Uid(GIVEN, pid)
        self._by_pid[pid] = uid

    def reaped(self, pid: int) -> int | None:
        """The task process `pid` is reaped: its uid (None if it had none), now REAPED."""
        uid = self._by_pid.pop(pid, None)
        if uid is not None:
            self._uids[uid] = _Uid(REAPED)
        return uid

    def sweep(self, uid: int) -> None:
        """Something a task left may live under the REAPED `uid`: the sweeper must see to it, now."""
        self._expect(uid, REAPED, "swept")
        self._uids[uid] = _Uid(SWEEP_DUE)

    def release(self, uid: int) -> None:
        """Nothing of the REAPED `uid` is left (its tree is gone, or its pid namespace): it leaves the ledger.

        Raises:
            UidStateError: if `uid` is not REAPED: a live process has it, or only the sweeper may say it is empty.
        """
        self._expect(uid, REAPED, "released")
        del self._uids[uid]

    def due(self, now: float) -> list[int]:
        """The uids whose sweep may be asked now; `sweep_at` becomes when the next of the others is due."""
        ready: list[int] = []
        self.sweep_at = None
        for uid, entry in self._uids.items():
            if entry.state != SWEEP_DUE:
                continue
            if entry.not_before <= now:
                ready.append(uid)
            elif self.sweep_at is None or entry.not_before < self.sweep_at:
                self.sweep_at = entry.not_before
        return ready

    def asked(self, uid: int) -> None:
        """The sweeper was asked about `uid` (SWEEP_DUE): no second ask until it answers."""
        entry = self._expect(uid, SWEEP_DUE, "asked about")
        self._uids[uid] = entry._replace(state=SWEEPING)

    def swept(self, uid: int, clean: bool, now: float) -> bool:
        """The sweeper's answer about `uid`: released if `clean` (True), else due again, soon, then later.

        Raises:
            UidStateError: if the sweeper was not asked about `uid`.
        """
        entry = self._expect(uid, SWEEPING, "answered")
        if clean:
            del self._uids[uid]
            return True
        pause = min(SWEEP_BACKOFF_S[1], SWEEP_BACKOFF_S[0] * 2 ** (entry.sweeps - SWEEPS_AT_ONCE))
        not_before = now + pause if entry.sweeps >= SWEEPS_AT_ONCE else 0.0
        self._uids[uid] = _Uid(SWEEP_DUE, sweeps=entry.sweeps + 1, not_before=not_before)
        return False

    def _expect(self, uid: int, state: str, what: str) -> _Uid:
        entry = self._uids.get(uid)
        if entry is None or entry.state != state:
            raise UidStateError(f"uid {uid} {what} while {entry.state if entry else 'not held here'}")
        return entry

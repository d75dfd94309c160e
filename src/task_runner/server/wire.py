"""The fork server's channel: the messages between the daemon and the fork server, as typed records.

Daemon <-> fork server: a SOCK_SEQPACKET socket, one message per packet, the first byte its kind.
The daemon's first message is a JSON spec and the fork server's first answer `H` + JSON (its
hello); after that:

    daemon -> Fork(spares)      fork a spare task process for each (uid, profile): under that uid (NO_UID:
                                run_as_user's own), in that sandbox profile (an index in the spec's list)
    daemon -> Kill(pid, serial, why)   kill that task process's tree now
    daemon -> Notice(pid, serial)      tell it to stop: SIGTERM to its process group
    fork server -> ForkFailed(spares)  these forks failed (EAGAIN, EMFILE): ask again later
    fork server -> Ready(pid, serial, uid, profile, cgroup)   a spare is ready; SCM_RIGHTS: its channel,
                                stdout, stderr. The serial tells this process from a later one that
                                gets the same pid, so a late kill never reaches the wrong one.
    fork server -> Exited(pid, status, usage, why, oom_killed)   a task process was reaped
    fork server -> Released(uids)   no process of these uids is left on the machine: they may serve again

The first messages (the spec, the hello) carry a catalogue of any size: each is sent as `chunks`,
parts of at most CHUNK bytes that `Reassembly` puts back together.

The channel between the daemon and a task process is task_runner.frames.

This module is imported by the fork server, so by every task process: enum, struct and typing only.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

NO_UID = 0xFFFF_FFFF
CHUNK = 32 << 10  # the most a first message carries per packet (a SEQPACKET message must fit the socket's buffer)
SPEC, HELLO = b"S", b"H"  # the daemon's first message and the fork server's answer
_MORE, _LAST = b"+", b"."
_COUNT = struct.Struct("!cI")
_KILL = struct.Struct("!cIIB")
_NOTICE = struct.Struct("!cII")
_READY = struct.Struct("!cIIIB")
_SPARE = struct.Struct("!IB")
_EXITED = struct.Struct("!cIiddqBB")


class Stop(enum.IntEnum):
    """Why the daemon had a task process killed: sent in a Kill, reported back in its Exited."""

    NONE = 0
    TIMEOUT = 1
    CANCELLED = 2
    RESULT_TOO_LARGE = 3
    LINGERED = 4  # it answered, then did not end
    STALLED = 5  # it sent a heartbeat, then none for longer than its heartbeat timeout


class Spare(NamedTuple):
    uid: int  # NO_UID: run_as_user's own
    profile: int  # its sandbox: an index in the spec's list of profiles


class Fork(NamedTuple):
    spares: tuple[Spare, ...]

    def pack(self) -> bytes:
        return _pack_spares(b"F", self.spares)


class ForkFailed(NamedTuple):
    spares: tuple[Spare, ...]

    def pack(self) -> bytes:
        return _pack_spares(b"E", self.spares)


class Released(NamedTuple):
    """No process of these uids is left on the machine (checked by a process of each uid, see forkserver)."""

    uids: tuple[int, ...]

    def pack(self) -> bytes:
        return _pack_uids(b"U", self.uids)


class Kill(NamedTuple):
    pid: int
    serial: int
    why: Stop

    def pack(self) -> bytes:
        return _KILL.pack(b"K", *self)


class Notice(NamedTuple):
    """Tell that task process to stop: SIGTERM to its process group (it is killed later, by a Kill)."""

    pid: int
    serial: int

    def pack(self) -> bytes:
        return _NOTICE.pack(b"N", *self)


class Ready(NamedTuple):
    pid: int
    serial: int
    uid: int
    profile: int
    cgroup: str  # its own cgroup v2 directory, or ""

    def pack(self) -> bytes:
        return _READY.pack(b"R", self.pid, self.serial, self.uid, self.profile) + self.cgroup.encode()


class Exited(NamedTuple):
    """A task process was reaped: the fork server's report, and the daemon's record of how the process ended."""

    pid: int
    status: int  # as wait(2) gives it
    user_s: float
    system_s: float
    max_rss_kib: int
    why: Stop  # why the daemon had it killed, if it did
    oom_killed: bool  # the kernel killed something in its cgroup for want of memory
    at: float = 0.0  # the daemon's loop time when the report came (not sent: the fork server's clock is not it)

    def pack(self) -> bytes:
        return _EXITED.pack(b"X", self.pid, self.status, self.user_s, self.system_s, self.max_rss_kib, self.why,
                            self.oom_killed)


Message = Fork | ForkFailed | Released | Kill | Notice | Ready | Exited


def unpack(message: bytes) -> Message:
    """The record in a message of the fork server's socket (any but the first two).

    Raises:
        ValueError: for a message of no known kind.
    """
    kind = message[:1]
    if kind in (b"F", b"E"):
        count = _COUNT.unpack_from(message)[1]
        spares = tuple(Spare(*_SPARE.unpack_from(message, _COUNT.size + i * _SPARE.size)) for i in range(count))
        return Fork(spares) if kind == b"F" else ForkFailed(spares)
    if kind == b"U":
        count = _COUNT.unpack_from(message)[1]
        return Released(struct.unpack_from(f"!{count}I", message, _COUNT.size))
    if kind == b"N":
        return Notice(*_NOTICE.unpack(message)[1:])
    if kind == b"K":
        pid, serial, why = _KILL.unpack(message)[1:]
        return Kill(pid, serial, Stop(why))
    if kind == b"R":
        pid, serial, uid, profile = _READY.unpack_from(message)[1:]
        return Ready(pid, serial, uid, profile, message[_READY.size:].decode())
    if kind == b"X":
        pid, status, user_s, system_s, max_rss, why, oom = _EXITED.unpack(message)[1:]
        return Exited(pid, status, user_s, system_s, max_rss, Stop(why), bool(oom))
    raise ValueError(f"unknown message kind {kind!r}")


def chunks(kind: bytes, payload: bytes) -> list[bytes]:
    """A first message of any size as packets: `kind`, then whether more follow, then a part."""
    parts = [payload[start:start + CHUNK] for start in range(0, len(payload), CHUNK)] or [b""]
    return [kind + (_LAST if i == len(parts) - 1 else _MORE) + part for i, part in enumerate(parts)]


class Reassembly:
    """The packets of one first message, put back together: `add` each; `whole` once `done`."""

    def __init__(self, kind: bytes) -> None:
        self._kind, self._parts, self.done = kind, bytearray(), False

    def add(self, packet: bytes) -> None:
        """Raises:
            ValueError: for a packet that is not part of this message (or end of file: b"").
        """
        if packet[:1] != self._kind or packet[1:2] not in (_MORE, _LAST) or self.done:
            raise ValueError(f"expected a part of a {self._kind!r} message, got {packet[:2]!r}")
        self._parts += packet[2:]
        self.done = packet[1:2] == _LAST

    @property
    def whole(self) -> bytes:
        return bytes(self._parts)


def _pack_spares(kind: bytes, spares: tuple[Spare, ...]) -> bytes:
    return _COUNT.pack(kind, len(spares)) + b"".join(_SPARE.pack(*spare) for spare in spares)


def _pack_uids(kind: bytes, uids: tuple[int, ...]) -> bytes:
    return _COUNT.pack(kind, len(uids)) + struct.pack(f"!{len(uids)}I", *uids)


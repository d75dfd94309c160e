"""The sweeper: a tiny process, the fork server's child, that tells when no process of a task uid is left.

For each uid it is asked about, it forks a process that drops to that uid alone and kills every
process of the uid with one kill(-1, SIGKILL) (the kernel makes it reach all of them at once, a
fork racing it included), then asks the kernel whether any is left: kill(-1)'s own result cannot
tell (it succeeds if any process at all exists), but the per-uid process count can, since an
unprivileged fork under RLIMIT_NPROC = 2 succeeds only for the uid's sole process (zombies not yet
reaped count too). It answers each uid with CLEAN or LEFT; the fork server asks again until CLEAN.

It is a fresh interpreter that imports nothing of the daemon (nor typing), so that the two forks for
each uid it empties copy a few MiB rather than the fork server and every task module it imported.
Protocol, on a SOCK_SEQPACKET socket: the fork server sends a uid (!I); the sweeper answers uid and
result (!IB).
End of file ends it. Usage: `python -m task_runner.server.forkserver.sweeper FD GID`.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import sys

REQUEST = struct.Struct("!I")
ANSWER = struct.Struct("!IB")
CLEAN, LEFT = 0, 1


def empty_uid(uid: int, gid: int) -> int:
    """Kill every process of `uid`; CLEAN if none is left then, LEFT otherwise (ask again)."""
    pid = os.fork()
    if pid == 0:
        _kill_all_then_count(uid, gid)
    while True:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):  # stopped by a process of the uid before its kill: end it, ask again
            os.kill(pid, signal.SIGKILL)
            continue
        return CLEAN if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CLEAN else LEFT


def _kill_all_then_count(uid: int, gid: int) -> None:  # never returns: it ends with os._exit
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # no capability is left: it may signal that uid's processes alone
        os.kill(-1, signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
        try:
            pid = os.fork()
        except BlockingIOError:  # EAGAIN: a process of the uid is still there (dying, or not yet reaped)
            os._exit(LEFT)
        if pid == 0:
            os._exit(CLEAN)
        os.waitpid(pid, 0)
        os._exit(CLEAN)
    finally:
        os._exit(LEFT)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    gid = int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fork server decides when it ends
    while request := sock.recv(REQUEST.size):
        (uid,) = REQUEST.unpack(request)
        sock.send(ANSWER.pack(uid, empty_uid(uid, gid)))


if __name__ == "__main__":
    main()

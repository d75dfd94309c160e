"""The init maker: a tiny process, the fork server's child, that makes the pid 1 of each sandboxed task's
pid namespace.

The kernel delivers to a namespace's pid 1 no signal it has no handler for, not even its own: abort(),
kill(getpid(), ...) and RLIMIT_CPU's SIGXCPU would do nothing to a task that was pid 1. So a task with
`processes = "private"` is not pid 1: for each, this process makes a new pid namespace and its pid 1,
an init that only sleeps, and hands the fork server a pidfd of it; the fork server forks the task into
that namespace (setns on the pidfd), as its own child, so that it reaps the task and reads its exit
status as it would on the host. When the task has been reaped the fork server kills the init, and the
kernel kills whatever the task left in the namespace; the pidfd becomes readable once all of it is gone.

It is a fresh interpreter that imports nothing of the daemon (nor typing), so that each init is a fork
of a few MiB rather than of the fork server and every task module it imported: that second fork of the
fork server had cost a sandboxed task more CPU than its own fork. Protocol, on a SOCK_SEQPACKET socket:
the fork server sends one byte per init it wants; each answer is one byte, 0 with the init's pidfd
attached, or 1 (it could not make one: out of processes). End of file ends it, and its inits die with
it. Usage: `python -m task_runner.server.inits FD`.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys

CLONE_NEWPID = 0x2000_0000
PR_SET_PDEATHSIG = 1
MADE, FAILED = b"\0", b"\1"
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def make(own: int, alive: int) -> int:
    """Fork an init in a new pid namespace; its pid. `own`: our pid namespace; `alive`: a pidfd of us."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    try:
        pid = os.fork()  # pid 1 of the new namespace
    finally:
        # Back to our own for the next: unshare refuses a new namespace while the last one is pending.
        if os.getpid() != 1:
            _check(_libc.setns(own, CLONE_NEWPID), "setns back to our pid namespace")
    if pid == 0:
        _become_init(alive)
    return pid


def _become_init(alive: int) -> None:  # never returns
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # with the maker (so with the fork server) it goes
        if select.select([alive], [], [], 0)[0]:  # the maker died before prctl took effect
            os._exit(0)
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        # Orphans of the task's tree that end after the task are reaped by the kernel; SIGKILL from the
        # fork server (outside the namespace) is the only signal that reaches it.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fork server decides when it ends
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps ended inits: the fork server holds pidfds
    alive = os.pidfd_open(os.getpid())
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        while sock.recv(1):
            try:
                pidfd = os.pidfd_open(make(own, alive))
            except OSError:
                sock.send(FAILED)
                continue
            socket.send_fds(sock, [MADE], [pidfd])
            os.close(pidfd)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the fork server died: so do we, and our inits with us


if __name__ == "__main__":
    main()

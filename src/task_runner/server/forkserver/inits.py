"""The init maker: a tiny process, the fork server's child, that makes the pid 1 of each sandboxed task's
pid namespace.

The kernel delivers to a namespace's pid 1 no signal it has no handler for, not even its own: abort(),
kill(getpid(), ...) and RLIMIT_CPU's SIGXCPU would do nothing to a task that was pid 1. So a task with
`processes = "private"` is not pid 1: for each, this process makes a new pid namespace and its pid 1,
an init that only sleeps, and hands the fork server a pidfd of it; the fork server forks the task into
that namespace (setns on the pidfd), as its own child, so that it reaps the task and reads its exit
status as it would on the host. When the task has been reaped the fork server kills the init, and the
kernel kills whatever the task left in the namespace; the pidfd becomes readable once all of it is gone.

It is a fresh interpreter that imports nothing of the daemon but the sandbox's ctypes layer
(task_runner.server.sandbox.libc: ctypes, os and contextlib, in an empty package), nor typing, so that each
init is a fork of a few MiB rather than of the fork server and every task module it imported: that second fork of the
fork server had cost a sandboxed task more CPU than its own fork. Protocol, on a SOCK_SEQPACKET socket:
the fork server sends one byte per init it wants; each answer is one byte, 0 with the init's pidfd
attached, or 1 (it could not make one: out of processes). End of file ends it, and its inits die with
it. Usage: `python -m task_runner.server.forkserver.inits FD`.

An init is made here, in the host's mount namespace, before its task process exists; once that process (pid 2
of the namespace) has made its sandbox, it asks the init (JOIN_ME) to move into its mount, network and IPC
namespaces, and the init answers (JOINED) once it has, keeping no capability: no path through /proc/1
(root, cwd, fd, mem, environ) leads outside the sandbox. It is not dumpable, so a task, even one of its uid,
cannot read its memory or descriptors either, once it has joined.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys

from task_runner.server.sandbox.libc import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    LINUX_CAPABILITY_VERSION_3,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
    check,
    libc,
)

# The task process (task_runner.server.sandbox.pids) asks with JOIN_ME + a bit for each of JOINED_NAMESPACES it made.
JOIN_ME, JOINED, FAILED_TO_JOIN = signal.SIGRTMIN, signal.SIGUSR2, signal.SIGPWR
JOINED_NAMESPACES = (CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUSER)
MADE, FAILED = b"\0", b"\1"


def make(own: int, alive: int) -> int:
    """Fork an init in a new pid namespace; its pid, once it is ready to be asked to join its task's namespaces.
    `own`: our pid namespace; `alive`: a pidfd of us."""
    check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    ready_r, ready_w = os.pipe()
    try:
        pid = os.fork()  # pid 1 of the new namespace
    finally:
        # Back to our own for the next: unshare refuses a new namespace while the last one is pending.
        if os.getpid() != 1:
            check(libc.setns(own, CLONE_NEWPID), "setns back to our pid namespace")
    if pid == 0:
        os.close(ready_r)
        become_init(alive, ready_w)
    os.close(ready_w)
    try:
        if not os.read(ready_r, 1):
            raise OSError("an init ended before it was ready")
    finally:
        os.close(ready_r)
    return pid


def become_init(alive: int | None, ready: int) -> None:  # never returns
    """Be the sleeping pid 1 of a task's pid namespace; write a byte to `ready` once JOIN_ME is heard."""
    try:
        if alive is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # with the maker (so with the fork server) it goes
            if select.select([alive], [], [], 0)[0]:  # the maker died before prctl took effect
                os._exit(0)
        # Orphans of the task's tree that end after the task are reaped by the kernel; SIGKILL from the
        # fork server (outside the namespace) is the only signal that reaches it, and JOIN_ME once.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        for bits in range(1 << len(JOINED_NAMESPACES)):
            signal.signal(JOIN_ME + bits, _join_task)
        os.write(ready, b"\0")
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _join_task(signum: int, frame: object) -> None:
    """Move into pid 2's (the task process's) mount, network, IPC and user namespaces, then keep no capability."""
    for bits in range(1 << len(JOINED_NAMESPACES)):  # once: the task that runs later cannot make it move again
        signal.signal(JOIN_ME + bits, signal.SIG_IGN)
    answer = FAILED_TO_JOIN
    try:
        # Only those the task process made, which the signal's number tells: joining one it shares with us is a
        # no-op that would still need CAP_SYS_ADMIN over its owner (the host's: an ordinary user has none).
        flags = sum(flag for bit, flag in enumerate(JOINED_NAMESPACES) if (signum - JOIN_ME) >> bit & 1)
        pidfd = os.pidfd_open(2)
        try:
            # The user namespace last, on its own: from inside it we would have no capability over the others,
            # which its parent owns.
            others = flags & ~CLONE_NEWUSER
            check(libc.setns(pidfd, others) if others else 0, "setns into the task's namespaces")
            check(libc.setns(pidfd, CLONE_NEWUSER) if flags & CLONE_NEWUSER else 0, "setns into its user namespace")
        finally:
            os.close(pidfd)
        os.chdir("/")
        header = ctypes.create_string_buffer(LINUX_CAPABILITY_VERSION_3.to_bytes(4, sys.byteorder) + bytes(4), 8)
        check(libc.capset(header, ctypes.create_string_buffer(24)), "capset")
        answer = JOINED
    except OSError:
        pass  # the task process gives up its sandbox (it never runs a task): nothing to say here
    # Not dumpable from now on: no task, even one of its uid, reads its memory or its /proc entries. (Until now
    # the fork server had to reach it by its pidfd, which needs ptrace access.)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    with contextlib.suppress(OSError):
        os.kill(2, answer)


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

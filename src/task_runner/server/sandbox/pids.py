"""A task's processes: the fork server forks it into the pid namespace of an init, which then joins its sandbox.

With `processes`, the fork server forks a task process into a new pid namespace (`PidNamespaces.fork`), whose
pid 1 is an init the init maker made (task_runner.server.forkserver.inits); the task process is pid 2 there, the fork
server's own child. When the task ends its init is killed, and the kernel kills whatever the task left. Once
the task process has made its sandbox, it has the init join it (`init_joins`), so that no path through /proc/1
leads outside.
"""

from __future__ import annotations

import os
import signal

from task_runner.server.forkserver import inits
from task_runner.server.sandbox.libc import CLONE_NEWPID, SandboxError, check, libc, while_dumpable

INIT_JOIN_TIMEOUT_S = 30.0  # it answers at once; a machine that is very busy may delay it (a spare waits)


class PidNamespaces:
    """The fork server's side of `processes`: fork a task process into the pid namespace of an init.

    setns() on a pidfd of the init (task_runner.server.forkserver.inits makes them) changes only the namespace
    of the caller's next children; it goes back to its own right after the fork.
    """

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self, init: int | None) -> int:
        """os.fork(); the child in the pid namespace whose pid 1 `init` (a pidfd) is, if one is given."""
        if init is None:
            return os.fork()
        check(libc.setns(init, CLONE_NEWPID), "setns into the task's pid namespace")
        try:
            pid = os.fork()
        except BaseException:
            self._back()
            raise
        if pid != 0:
            try:
                self._back()
            except SandboxError:
                # Reaped now: unreaped, it would keep its init from ever ending (the init's exit waits for it).
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        return pid

    def _back(self) -> None:
        check(libc.setns(self._own, CLONE_NEWPID), "setns back to the fork server's pid namespace")


def init_joins(made: int) -> None:
    """Have this pid namespace's init (task_runner.server.forkserver.inits) move into the namespaces we `made` (mount,
    network, IPC, user), so that no path through /proc/1 leads outside the sandbox; wait until it says it has
    (or could not). Our real uid must still be the init's, which lets us signal it."""
    if os.getpid() != 2:
        raise SandboxError(f"a sandboxed task process is pid 2 of its namespace, not {os.getpid()}")
    answers = {inits.JOINED, inits.FAILED_TO_JOIN}
    signal.pthread_sigmask(signal.SIG_BLOCK, answers)
    try:
        # Dumpable while the init joins: setns by a pidfd needs ptrace access, which a process forked from one
        # exec'd outside a user namespace otherwise grants only to a holder of CAP_SYS_PTRACE there (rootless:
        # nobody).
        with while_dumpable():
            # Which namespaces it made, one bit each in the signal's number.
            os.kill(1, inits.JOIN_ME + sum(1 << bit for bit, flag in enumerate(inits.JOINED_NAMESPACES) if made & flag))
            got = signal.sigtimedwait(answers, INIT_JOIN_TIMEOUT_S)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, answers)
    if got is None:
        raise SandboxError(f"the init of the task's pid namespace did not answer within {INIT_JOIN_TIMEOUT_S:.0f} s")
    if got.si_signo != inits.JOINED:
        raise SandboxError("the init of the task's pid namespace could not join its mount namespace")

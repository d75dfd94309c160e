"""Which parts of a sandbox this machine allows, told at the fork server's start: each is tried in a throwaway
child, so that the daemon can say what it could not set up."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from task_runner.server.forkserver import inits
from task_runner.server.sandbox import pids, users
from task_runner.server.sandbox.contain import enter
from task_runner.server.sandbox.libc import CLONE_NEWPID, SandboxError, unshare
from task_runner.server.sandbox.profile import PARTS, Profile


def probe(parts: set[str], seccomp: bytes, load_filter: Callable[[bytes], None]) -> dict[str, str]:
    """Which of `parts` this machine cannot set up, each with why: each tried in a throwaway child."""
    trials: dict[str, Callable[[], object]] = {
        "filesystem": lambda: enter(Profile(filesystem=True, tmp_bytes=1 << 20)),
        "network": lambda: enter(Profile(network=True)),
        "processes": lambda: _under_an_init(lambda: pids.init_joins(enter(Profile(processes=True)))),
        "syscalls": lambda: _filtered(seccomp, load_filter),
    }
    return {part: why for part in PARTS if part in parts and (why := _try(trials[part], os.fork))}


def probe_user_namespace() -> str:
    """"" if a task process can have a user namespace of its own here, else why not (tried in a throwaway child)."""
    def trial() -> None:
        users.task_user_namespace()
        users.lock_privileges(anew=True)

    return _try(trial, os.fork)


def _filtered(seccomp: bytes, load_filter: Callable[[bytes], None]) -> None:
    """Load the filter as a task process does: no_new_privs first."""
    users.no_new_privs()
    load_filter(seccomp)


def _under_an_init(trial: Callable[[], object]) -> None:
    """Run `trial` as a sandboxed task process runs: forked into a new pid namespace by a pidfd of its init."""
    unshare(CLONE_NEWPID)
    ready_r, ready_w = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the new namespace, until killed
        inits.become_init(None, ready_w)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    pidfd = os.pidfd_open(init)
    try:
        why = _try(trial, lambda: pids.PidNamespaces().fork(pidfd))
    finally:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        os.close(pidfd)
    if why:
        raise SandboxError(why)


def _try(trial: Callable[[], object], fork: Callable[[], int]) -> str:
    """Run `trial` in a child made by `fork`; "" if it worked, else what went wrong."""
    read_end, write_end = os.pipe()
    try:
        pid = fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return str(exc)
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            trial()
        except BaseException as exc:  # whatever it is, it is the answer
            os.write(write_end, str(exc).encode()[:1000])
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        why = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0 and not why:
        why = f"the trial ended with status {status}"
    return why

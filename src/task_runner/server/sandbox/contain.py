"""Becoming a task process: every step from the root process fork() gives to a task's, in order, in one function.

A spare task process, still root right after fork(), enters what its profile asks for, then drops to its uid
and waits; so the sandbox costs no latency. With `processes`, the fork server forked it into a new pid
namespace (task_runner.server.sandbox.pids), whose init joins the sandbox once it is made. `become_task_process`
reads top to bottom as bubblewrap's setup does; each part of the sandbox is a module of this package:

- `filesystem` (mounts): a mount namespace of its own, the host read-only, its own /tmp, /dev and hides;
- `network` (network): a network namespace with only its loopback, up;
- `processes` (pids, mounts): besides the pid namespace, an IPC namespace (System V and POSIX IPC die with
  it) and a fresh /proc (it sees its own tree only) and /dev/mqueue;
- a user namespace of its own and no capability in any set (users);
- `syscalls` (seccomp): the filter, loaded last;
- the task's limits, once its assignment names them (its cgroup's are written by the daemon beforehand,
  task_runner.server.sandbox.cgroups.limit: spares are shared by tasks of different limits, and the task
  process has no right to its own cgroup).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
from collections.abc import Iterator, Mapping
from typing import NamedTuple, NoReturn

from task_runner import frames
from task_runner.server import wire
from task_runner.server.forkserver import task_process
from task_runner.server.registry import Loaded
from task_runner.server.sandbox import mounts, network, pids, seccomp, users
from task_runner.server.sandbox.libc import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUSER,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
    prctl,
    unshare,
    write_file,
)
from task_runner.server.sandbox.profile import Profile

SETUP_FAILED = 71  # the exit code of a task process whose sandbox could not be set up: it never runs a task
# Memory is bounded by the address space (RLIMIT_AS), which counts every mapping, shared ones
# too: RLIMIT_DATA would let mmap(MAP_SHARED | MAP_ANONYMOUS) through. The limit is what the
# task may add to the address space it starts with. A core dump's soft and hard limits are set alike: with
# both at 0 (the default) neither the task nor a program it runs can ask for one again.
LIMITS = (
    ("memory", resource.RLIMIT_AS), ("cpu_time", resource.RLIMIT_CPU), ("open_files", resource.RLIMIT_NOFILE),
    ("processes", resource.RLIMIT_NPROC), ("file_size", resource.RLIMIT_FSIZE), ("core", resource.RLIMIT_CORE),
)


class Setup(NamedTuple):
    """What the fork server gives every task process it forks."""

    owner: tuple[int, int] | None  # the user and group tasks run as, when it is not the fork server's
    user_namespaces: bool  # a user namespace of its own for each task process that has a sandbox
    alive: int  # a pidfd of the fork server
    devnull: int
    registry: Mapping[str, Loaded | str]
    result_max_bytes: int


def become_task_process(setup: Setup, channel: int, out_w: int, err_w: int, uid: int, profile: Profile,
                        serial: int) -> NoReturn:
    """Every step from the root we were forked as to the task's user with no privilege, then the task: in order.

    Args:
        channel: the task channel's socket (fd 3 from now on); out_w, err_w: the output pipes (fds 1 and 2).
        uid: the task uid it runs as, or wire.NO_UID (the owner's, or ours).
        serial: its number, which names its working directory on a private /tmp.
    """
    os.setsid()  # its own session and process group: one killpg reaches the whole group
    _first_for_the_oom_killer()
    with _never_outside_the_sandbox(err_w):
        made = enter(profile)  # as root, before it waits: the sandbox costs the call no time
        os.umask(0o077)  # what it creates is its own: other tasks may share its group
        task_uid = _take_group_and_effective_uid(setup.owner, uid)
        if made and setup.user_namespaces:
            users.task_user_namespace()
            made |= CLONE_NEWUSER
            users.lock_privileges(anew=True)
        if profile.processes:
            pids.init_joins(made)
        if setup.owner is not None:
            os.setresuid(task_uid, task_uid, task_uid)
        users.drop_capabilities()  # no capability in any set, whoever the task runs as
    if setup.owner is not None and uid != wire.NO_UID:
        # Changing user made it undumpable, which would give its own /proc to root. With a uid
        # of its own no other task can use that; sharing a uid, it stays undumpable, so that
        # tasks of that uid cannot read each other's memory or take each other's descriptors.
        prctl(PR_SET_DUMPABLE, 1)
    if profile.private_tmp:
        _private_workdir(serial)
    # Set-user-ID and file capabilities never raise what it or its descendants may do: a set-user-ID
    # copy of a program one task leaves (its own uid's) cannot run as that uid for a later task.
    users.no_new_privs()
    _die_with_the_fork_server(setup.alive)  # after the user change, which would undo it
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned descendants stay in this task's tree
    _default_signals()
    _standard_fds(setup.devnull, out_w, err_w, channel)
    if profile.seccomp:  # last: it refuses what the steps above needed
        seccomp.load(profile.seccomp)
    # It waits for its task, then sets the limits its assignment names (apply_limits) before any of its code runs.
    task_process.main(setup.registry, setup.result_max_bytes, apply_limits, profile.private_tmp)


def enter(profile: Profile) -> int:
    """Set up the namespaces and mounts of `profile` in this process (root, single-threaded); the CLONE_* flags of
    the namespaces it made. With `processes`, pids.init_joins follows, once the task process has its user.

    Raises:
        SandboxError: naming the step that failed; the process must then not run a task.
    """
    flags = (CLONE_NEWNS if profile.filesystem or profile.processes else 0) \
        | (CLONE_NEWNET if profile.network else 0) | (CLONE_NEWIPC if profile.processes else 0)
    if not flags:
        return 0
    unshare(flags)
    if profile.network:
        network.loopback_up()
    if profile.filesystem:
        mounts.private_filesystem(profile.tmp_bytes, profile.writable, profile.code, profile.hide)
        if profile.network:
            mounts.own_sys()
    elif flags & CLONE_NEWNS:
        mounts.private_propagation()
    if profile.processes:
        mounts.fresh_proc()
    if profile.filesystem:
        os.chdir("/tmp")  # (the task's working directory is made there once it has its uid)
    return flags


def apply_limits(values: frames.Limits, limited: set[str]) -> None:
    """Set the limits of a task's assignment on this process (those its cgroup does not carry); each name set goes
    into `limited`, so that the task process can tell which one an error shows was hit."""
    for (name, which), wanted in zip(LIMITS, values, strict=True):
        if wanted == frames.NO_LIMIT:
            continue
        if wanted == frames.BY_CGROUP:
            limited.add(name)
            continue
        value = wanted + _address_space() if which == resource.RLIMIT_AS else wanted
        _, hard = resource.getrlimit(which)
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: SIGXCPU at the soft limit, then SIGKILL a second later should the task ignore it.
        grace = which == resource.RLIMIT_CPU and (hard == resource.RLIM_INFINITY or soft < hard)
        resource.setrlimit(which, (soft, soft + 1 if grace else soft))
        limited.add(name)


@contextlib.contextmanager
def _never_outside_the_sandbox(err_w: int) -> Iterator[None]:
    """Never run a task outside the sandbox it was promised: a step that fails ends the process, and the call is
    answered CRASHED, with what failed."""
    try:
        yield
    except OSError as exc:
        os.write(err_w, f"the task's sandbox could not be set up: {exc}\n".encode())
        os._exit(SETUP_FAILED)


def _first_for_the_oom_killer() -> None:
    """The first the kernel's OOM killer picks, in a container's or a unit's memory limit alike: a task that
    eats the memory dies, not the daemon (lowering it again takes CAP_SYS_RESOURCE)."""
    with contextlib.suppress(OSError):
        write_file("/proc/self/oom_score_adj", "1000")


def _take_group_and_effective_uid(owner: tuple[int, int] | None, uid: int) -> int:
    """Take the owner's group, and the uid the task runs as for the effective uid alone (the securebits keep the
    capabilities through it): the real one is still the init's, which lets us signal it to join us. The uid."""
    if owner is None:
        return os.geteuid()
    own_uid, gid = owner
    task_uid = own_uid if uid == wire.NO_UID else uid
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(-1, task_uid, -1)
    return task_uid


def _private_workdir(serial: int) -> None:
    """Its working directory and TMPDIR: fresh, its own, on its private /tmp."""
    os.mkdir(workdir := f"/tmp/task-{serial}", 0o700)
    os.chdir(workdir)
    os.environ["TMPDIR"] = os.environ["TMP"] = os.environ["TEMP"] = workdir


def _die_with_the_fork_server(alive: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([alive], [], [], 0)[0]:  # it died before prctl took effect (getppid() is 0
        os._exit(0)                            # from a pid namespace of its own: it cannot tell)


def _default_signals() -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _standard_fds(devnull: int, out_w: int, err_w: int, channel: int) -> None:
    """stdin /dev/null, stdout and stderr the output pipes, the channel fd 3; no other descriptor."""
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(channel, task_process.CHANNEL_FD, inheritable=False)
    os.closerange(task_process.CHANNEL_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _address_space() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()

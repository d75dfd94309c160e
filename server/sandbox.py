"""A task's sandbox: the namespaces and mounts a task process sets up for itself before it waits.

A spare task process, still root right after fork(), enters what its profile asks for, then drops
to its uid and waits; so the sandbox costs no latency. With `processes`, the fork server forks it
into a new pid namespace (`PidNamespaces.fork`): it is pid 1 there, becomes the task's init
(ForkServer._become_init) and forks the task as pid 2; when the task ends its init exits, and the
kernel kills whatever the task left. Then, in the process itself (`enter`):

- `filesystem`: a mount namespace of its own whose every mount is read-only and private (nothing
  mounted here reaches the host, nor the host's new mounts here); one fresh tmpfs of `tmp_bytes`,
  nosuid and nodev, serves as /tmp, /var/tmp and /dev/shm and is its working directory: it goes with
  the namespace, so nothing is left to remove. `writable` paths are cloned before and put back
  writable after; `hide` paths are covered by an empty read-only tmpfs (a directory) or /dev/null
  (a file). What the daemon runs from under /tmp, /var/tmp or /dev/shm (`code_paths`: its
  interpreter, `sys.path`, the task modules' folders) is bound back read-only, nosuid and nodev, so
  that a daemon installed there still serves its tasks (as bubblewrap's `--ro-bind`).
- `network`: a network namespace with only its loopback, up: no route out, not the host's loopback,
  no other task's abstract unix sockets.
- `processes`: besides the pid namespace, an IPC namespace (System V and POSIX IPC die with it) and
  a fresh /proc (it sees its own tree only) and /dev/mqueue.

`probe` tells, at start, which parts this machine allows, so that the daemon can say what it could
not set up. Imported by the fork server, so by every task process: ctypes, os and struct only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from task_runner.server import inits

CLONE_NEWNS = 0x0002_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWNET = 0x4000_0000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x4_0000
AT_FDCWD = -100
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# Syscalls added since Linux 5.2 have one number on every architecture.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
# Securebits, each with its lock: no root privilege by uid 0 (NOROOT), none kept or dropped by a uid change
# (NO_SETUID_FIXUP: the sets are emptied by hand), KEEP_CAPS off, no ambient raise: a task cannot regain any.
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x2008_0522
PARTS = ("filesystem", "network", "processes", "syscalls")
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # what a private filesystem replaces with its own tmpfs
INIT_JOIN_TIMEOUT_S = 30.0  # it answers at once; a machine that is very busy may delay it (a spare waits)
SETUP_FAILED = 71  # the exit code of a task process whose sandbox could not be set up: it never runs a task
_MOUNT_ATTR = struct.Struct("QQQQ")  # struct mount_attr: attr_set, attr_clr, propagation, userns_fd
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """A part of a sandbox could not be set up; the message names the step."""


class Profile(NamedTuple):
    """What one kind of task process sets up; the daemon sends the distinct ones to the fork server."""

    filesystem: bool = False
    network: bool = False
    processes: bool = False
    seccomp: bytes = b""  # the filter to load last (task_runner.server.seccomp), or none
    tmp_bytes: int = 256 << 20
    hide: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # bound back read-only under the private /tmp (the fork server's `code_paths`)

    @property
    def parts(self) -> set[str]:
        """The parts (of PARTS) it sets up."""
        wanted = (self.filesystem, self.network, self.processes, bool(self.seccomp))
        return {part for part, on in zip(PARTS, wanted, strict=True) if on}

    @property
    def private_tmp(self) -> bool:
        """Its /tmp is its own and its working directory: the daemon makes it none."""
        return self.filesystem

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "seccomp": self.seccomp.hex()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(data["filesystem"], data["network"], data["processes"], bytes.fromhex(data["seccomp"]),
                   data["tmp_bytes"], tuple(data["hide"]), tuple(data["writable"]), tuple(data.get("code", ())))

    def without(self, parts: set[str]) -> Profile:
        """This profile without the parts this machine cannot set up."""
        return self._replace(filesystem=self.filesystem and "filesystem" not in parts,
                             network=self.network and "network" not in parts,
                             processes=self.processes and "processes" not in parts,
                             seccomp=b"" if "syscalls" in parts else self.seccomp)


def _check(result: int, what: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise SandboxError(number, f"{what}: {os.strerror(number)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _set_mount_attr(dirfd: int, path: str, flags: int, attr_set: int = 0, propagation: int = 0) -> None:
    attr = ctypes.create_string_buffer(_MOUNT_ATTR.pack(attr_set, 0, propagation, 0), _MOUNT_ATTR.size)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, dirfd, path.encode(), flags, attr, _MOUNT_ATTR.size),
           f"mount_setattr {path or 'a cloned tree'}")


def no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # dropping one the kernel does not have fails with EINVAL, which lock_privileges tolerates


LAST_CAPABILITY = _last_capability()  # read once, by the fork server: a task process's /proc may be its own


def lock_privileges(anew: bool = False) -> None:
    """Empty the bounding and ambient sets and lock the securebits, for this process and all it forks from now on:
    no capability can come back by exec. The effective and permitted sets stay: the fork server keeps what it
    needs, and each task process empties them (drop_capabilities). Done once, by the fork server once it has
    exec'd its helpers: dropping a capability from the bounding set costs a credentials copy, 41 of them a task;
    and again (`anew`) by a task process in a user namespace of its own, which starts with a full set."""
    if not anew and os.geteuid() != 0:  # an ordinary user has none to drop, nor the right to touch the bounding set
        return
    for capability in range(LAST_CAPABILITY + 1):
        if _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"prctl(PR_CAPBSET_DROP, {capability})")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    _check(_libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")


def drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets: with lock_privileges' bounding set and securebits, a
    task, root or not, is then root by uid alone, with no capability and none to regain."""
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, bytes(24)), "capset")  # two struct __user_cap_data_struct, all zero



def own_user_namespace() -> str:
    """Move this process (an ordinary user's, single-threaded, before it forks anything) into a user namespace
    of its own, where it is root and may set up every part of a sandbox: "" if it did, else why not.

    The namespace maps its root to this user alone ("0 UID 1"), which an unprivileged process may write for
    itself; the kernel's user.max_user_namespaces, kernel.unprivileged_userns_clone or an AppArmor policy
    (Ubuntu's apparmor_restrict_unprivileged_userns) may refuse the namespace: then no part but the syscall
    filter can be set up, and the daemon says so.
    """
    uid, gid = os.geteuid(), os.getegid()
    try:
        unshare(CLONE_NEWUSER)
    except SandboxError as exc:
        return f"this user may not make a user namespace ({exc.strerror}): unprivileged user namespaces are off"
    try:
        _write_id_maps(f"0 {uid} 1", f"0 {gid} 1")
    except OSError as exc:
        return f"its user namespace's uid map could not be written ({exc.strerror})"
    return ""


def in_the_hosts_user_namespace() -> bool:
    """Whether this process is in the initial user namespace (its map is the whole range, to itself)."""
    with open("/proc/self/uid_map") as f:
        return f.read().split() == ["0", "0", "4294967295"]


def task_user_namespace() -> None:
    """Move this task process into a user namespace of its own that maps its effective uid and gid alone, each
    to itself. Every other namespace of its sandbox was made before, so is owned by the fork server's user
    namespace: what the task could do as root in its own is over nothing but that namespace. There it starts
    with every capability and default securebits: lock_privileges(anew=True) and drop_capabilities follow.

    A process may write that one-line map for itself; its /proc/self is its own to write only while it is
    dumpable (a uid change made it not), so it is for these few writes.
    """
    uid, gid = os.geteuid(), os.getegid()
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    try:
        unshare(CLONE_NEWUSER)
        _write_id_maps(f"{uid} {uid} 1", f"{gid} {gid} 1")
    finally:
        _libc.prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)


def _write_id_maps(uid_map: str, gid_map: str) -> None:
    """Map this process's new user namespace; setgroups is denied first, as the kernel asks of a one-line map."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


class PidNamespaces:
    """The fork server's side of `processes`: fork a task process into the pid namespace of an init.

    setns() on a pidfd of the init (task_runner.server.inits makes them) changes only the namespace
    of the caller's next children; it goes back to its own right after the fork.
    """

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self, init: int | None) -> int:
        """os.fork(); the child in the pid namespace whose pid 1 `init` (a pidfd) is, if one is given."""
        if init is None:
            return os.fork()
        _check(_libc.setns(init, CLONE_NEWPID), "setns into the task's pid namespace")
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
        _check(_libc.setns(self._own, CLONE_NEWPID), "setns back to the fork server's pid namespace")


def enter(profile: Profile) -> int:
    """Set up the namespaces and mounts of `profile` in this process (root, single-threaded); the CLONE_* flags of
    the namespaces it made. With `processes`, init_joins follows, once the task process has its user.

    Raises:
        SandboxError: naming the step that failed; the process must then not run a task.
    """
    flags = (CLONE_NEWNS if profile.filesystem or profile.processes else 0) \
        | (CLONE_NEWNET if profile.network else 0) | (CLONE_NEWIPC if profile.processes else 0)
    if not flags:
        return 0
    unshare(flags)
    if profile.network:
        _loopback_up()
    if profile.filesystem:
        # Cloned now, while the host's /tmp (which a writable path may be under) is still in sight; a task may
        # write there, but never through a set-user-ID file or a device node.
        clones = [(path, _clone(path)) for path in profile.writable]
        for _, fd in clones:
            _set_mount_attr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        _set_mount_attr(AT_FDCWD, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, MS_PRIVATE)
        # Cloned after the read-only pass, so read-only themselves (a detached clone keeps its attributes).
        code = [(path, _clone(path)) for path in profile.code]
        for _, fd in code:
            _set_mount_attr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE,
                            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        _minimal_dev()
        _private_tmp(profile.tmp_bytes)
        for path, fd in code + clones:
            os.makedirs(path, exist_ok=True)  # under the fresh /tmp, its mount point is made anew
            _move_mount(fd, path)
        for path in profile.hide:
            _hide(path)
        if profile.network:  # its own interfaces alone under /sys/class/net, read-only like the rest
            _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    elif flags & CLONE_NEWNS:  # (only in a mount namespace of its own: never the host's propagation)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if profile.processes:
        _fresh_proc()
        if os.path.isdir("/dev/mqueue"):
            _mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if profile.filesystem:
        os.chdir("/tmp")  # (the task's working directory is made there once it has its uid)
    return flags


# What a task gets of the host's devices (bound from the host's /dev): nothing that reaches hardware, the
# kernel's log (kmsg) or its memory; a pty of its own from a fresh devpts instance.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Of a fresh /proc, what Docker and bubblewrap keep read-only (the kernel's settings, sysrq, interrupts, buses)
# and what they mask (the kernel's memory and keys, timers and scheduler internals).
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
PROC_MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/acpi", "/proc/scsi")


def _minimal_dev() -> None:
    """A fresh, read-only /dev of DEVICES, pts, ptmx, shm and mqueue, and the /proc/self/fd links."""
    clones = [(name, _clone(f"/dev/{name}")) for name in DEVICES if os.path.exists(f"/dev/{name}")]
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name, fd in clones:
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _move_mount(fd, f"/dev/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(f"/dev/{name}", 0o755)
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.symlink("/proc/self/fd", "/dev/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"/dev/{name}")
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _fresh_proc() -> None:
    """A /proc of this pid namespace, its kernel settings read-only and its windows on the kernel masked."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in PROC_READ_ONLY:
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in PROC_MASKED:
        _hide(path)


def init_joins(made: int) -> None:
    """Have this pid namespace's init (task_runner.server.inits) move into the namespaces we `made` (mount,
    network, IPC, user), so that no path through /proc/1 leads outside the sandbox; wait until it says it has
    (or could not). Our real uid must still be the init's, which lets us signal it."""
    if os.getpid() != 2:
        raise SandboxError(f"a sandboxed task process is pid 2 of its namespace, not {os.getpid()}")
    answers = {inits.JOINED, inits.FAILED_TO_JOIN}
    signal.pthread_sigmask(signal.SIG_BLOCK, answers)
    # Dumpable while the init joins: setns by a pidfd needs ptrace access, which a process forked from one exec'd
    # outside a user namespace otherwise grants only to a holder of CAP_SYS_PTRACE there (rootless: nobody).
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    try:
        # Which namespaces it made, one bit each in the signal's number.
        os.kill(1, inits.JOIN_ME + sum(1 << bit for bit, flag in enumerate(inits.JOINED_NAMESPACES) if made & flag))
        got = signal.sigtimedwait(answers, INIT_JOIN_TIMEOUT_S)
    finally:
        _libc.prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, answers)
    if got is None:
        raise SandboxError(f"the init of the task's pid namespace did not answer within {INIT_JOIN_TIMEOUT_S:.0f} s")
    if got.si_signo != inits.JOINED:
        raise SandboxError("the init of the task's pid namespace could not join its mount namespace")


def _move_mount(fd: int, path: str) -> None:
    """Attach a detached tree (from _clone) at `path`, and close its descriptor."""
    try:
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {path}")
    finally:
        os.close(fd)


def _clone(path: str) -> int:
    """A detached copy of the mount tree at `path` (a descriptor for move_mount)."""
    return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
                  f"open_tree {path}")


def code_paths() -> tuple[str, ...]:
    """What this process runs from that a private filesystem's /tmp would hide: the interpreter, the
    prefixes, `sys.path` and every loaded module's folder under PRIVATE_TMP, fewest folders that hold them all.

    Called once by the fork server, after it imported the tasks (so their folders count, editable installs too).
    """
    found: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if any(real.startswith(top + "/") for top in PRIVATE_TMP) and os.path.exists(real):
            found.add(real)

    for path in (sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix, *sys.path):
        if path:
            add(path if os.path.isdir(path) else os.path.dirname(path))
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            add(os.path.dirname(file))
    outermost = sorted(found)
    kept: list[str] = []
    for path in outermost:  # sorted: a folder comes before what it holds
        if not any(path.startswith(parent + "/") for parent in kept):
            kept.append(path)
    return tuple(kept)


def _private_tmp(size: int) -> None:
    """One tmpfs of `size` bytes as /tmp, /var/tmp and /dev/shm: what a task leaves there goes with it."""
    # An inode costs memory beyond the size: one for every 4 KiB of it, at least 4096.
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes={max(4096, size >> 12)},mode=755")
    for place, name in (("/var/tmp", "var-tmp"), ("/dev/shm", "shm"), ("/tmp", "tmp")):
        os.mkdir(f"/tmp/{name}")
        os.chmod(f"/tmp/{name}", 0o1777)
        # /tmp last: its own mount covers the tmpfs's root, which holds the other two.
        if os.path.isdir(place):
            _mount(f"/tmp/{name}", place, None, MS_BIND)


def _hide(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1,mode=755")
    else:
        _mount("/dev/null", path, None, MS_BIND)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _loopback_up() -> None:
    sock = _check(_libc.socket(2, 2, 0), "socket")  # AF_INET, SOCK_DGRAM: ctypes, not the socket module's import
    try:
        request = ctypes.create_string_buffer(struct.pack("16sH22x", b"lo", IFF_UP), 40)
        _check(_libc.ioctl(sock, SIOCSIFFLAGS, request), "bring the loopback up")
    finally:
        os.close(sock)


def _filtered(seccomp: bytes, load_filter: Callable[[bytes], None]) -> None:
    """Load the filter as a task process does: no_new_privs first."""
    no_new_privs()
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
        why = _try(trial, lambda: PidNamespaces().fork(pidfd))
    finally:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        os.close(pidfd)
    if why:
        raise SandboxError(why)


def probe(parts: set[str], seccomp: bytes, load_filter: Callable[[bytes], None]) -> dict[str, str]:
    """Which of `parts` this machine cannot set up, each with why: each tried in a throwaway child."""
    trials: dict[str, Callable[[], object]] = {
        "filesystem": lambda: enter(Profile(filesystem=True, tmp_bytes=1 << 20)),
        "network": lambda: enter(Profile(network=True)),
        "processes": lambda: _under_an_init(lambda: init_joins(enter(Profile(processes=True)))),
        "syscalls": lambda: _filtered(seccomp, load_filter),
    }
    return {part: why for part in PARTS if part in parts and (why := _try(trials[part], os.fork))}


def probe_user_namespace() -> str:
    """"" if a task process can have a user namespace of its own here, else why not (tried in a throwaway child)."""
    def trial() -> None:
        task_user_namespace()
        lock_privileges(anew=True)

    return _try(trial, os.fork)


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

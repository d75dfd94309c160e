"""A task's private filesystem: its read-only view of the host, its own /tmp, /dev, /proc and /sys, what it hides.

Set up by a task process in a mount namespace of its own (task_runner.server.sandbox.contain.enter): every
mount is read-only and private (nothing mounted here reaches the host, nor the host's new mounts here); one
fresh tmpfs of `tmp_bytes`, nosuid and nodev, serves as /tmp, /var/tmp and /dev/shm and is its working
directory: it goes with the namespace, so nothing is left to remove. `writable` paths are cloned before and
put back writable after; `hide` paths are covered by an empty read-only tmpfs (a directory) or /dev/null
(a file). What the daemon runs from under /tmp, /var/tmp or /dev/shm (`code_paths`: its interpreter,
`sys.path`, the task modules' folders) is bound back read-only, nosuid and nodev, so that a daemon installed
there still serves its tasks (as bubblewrap's `--ro-bind`).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import sys

from task_runner.server.sandbox.libc import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_RECURSIVE,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MOVE_MOUNT_F_EMPTY_PATH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    OPEN_TREE_CLONE,
    SYS_MOUNT_SETATTR,
    SYS_MOVE_MOUNT,
    SYS_OPEN_TREE,
    check,
    libc,
)

PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # what a private filesystem replaces with its own tmpfs
# What a task gets of the host's devices (bound from the host's /dev): nothing that reaches hardware, the
# kernel's log (kmsg) or its memory; a pty of its own from a fresh devpts instance.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Of a fresh /proc, what Docker and bubblewrap keep read-only (the kernel's settings, sysrq, interrupts, buses)
# and what they mask (the kernel's memory and keys, timers and scheduler internals).
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
PROC_MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/acpi", "/proc/scsi")
_MOUNT_ATTR = struct.Struct("QQQQ")  # struct mount_attr: attr_set, attr_clr, propagation, userns_fd


def private_filesystem(tmp_bytes: int, writable: tuple[str, ...], code: tuple[str, ...],
                       hide: tuple[str, ...]) -> None:
    """The host read-only and private, a minimal /dev, the private /tmp, `code` bound back read-only and
    `writable` writable (neither set-user-ID nor devices), `hide` covered. In a mount namespace of its own."""
    # Cloned now, while the host's /tmp (which a writable path may be under) is still in sight; a task may
    # write there, but never through a set-user-ID file or a device node.
    clones = [(path, _clone(path)) for path in writable]
    for _, fd in clones:
        _set_mount_attr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    _set_mount_attr(AT_FDCWD, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, MS_PRIVATE)
    # Cloned after the read-only pass, so read-only themselves (a detached clone keeps its attributes).
    code_clones = [(path, _clone(path)) for path in code]
    for _, fd in code_clones:
        _set_mount_attr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    _minimal_dev()
    _private_tmp(tmp_bytes)
    for path, fd in code_clones + clones:
        os.makedirs(path, exist_ok=True)  # under the fresh /tmp, its mount point is made anew
        _move_mount(fd, path)
    for path in hide:
        _hide(path)


def own_sys() -> None:
    """A fresh /sys, read-only like the rest: under /sys/class/net, its own network namespace's interfaces alone."""
    _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def private_propagation() -> None:
    """Nothing mounted here reaches the host, nor the host's new mounts here (only in a mount namespace of its
    own: never the host's propagation)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def fresh_proc() -> None:
    """A /proc of this pid namespace, its kernel settings read-only and its windows on the kernel masked; and a
    /dev/mqueue of its IPC namespace."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in PROC_READ_ONLY:
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in PROC_MASKED:
        _hide(path)
    if os.path.isdir("/dev/mqueue"):
        _mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


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


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _set_mount_attr(dirfd: int, path: str, flags: int, attr_set: int = 0, propagation: int = 0) -> None:
    attr = ctypes.create_string_buffer(_MOUNT_ATTR.pack(attr_set, 0, propagation, 0), _MOUNT_ATTR.size)
    check(libc.syscall(SYS_MOUNT_SETATTR, dirfd, path.encode(), flags, attr, _MOUNT_ATTR.size),
          f"mount_setattr {path or 'a cloned tree'}")


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


def _move_mount(fd: int, path: str) -> None:
    """Attach a detached tree (from _clone) at `path`, and close its descriptor."""
    try:
        check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
              f"move_mount {path}")
    finally:
        os.close(fd)


def _clone(path: str) -> int:
    """A detached copy of the mount tree at `path` (a descriptor for move_mount)."""
    return check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
                 f"open_tree {path}")


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

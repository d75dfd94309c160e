"""The sandbox's one ctypes layer: the libc handle, its one error check, and the kernel's constants, each once.

Imported by the fork server, so by every task process, and by the init maker (task_runner.server.forkserver.inits), a
fresh interpreter that must stay a few MiB: it imports ctypes, os and contextlib alone (all three loaded there
anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

# Namespaces: clone(2), unshare(2) and setns(2) flags.
CLONE_NEWTIME = 0x0000_0080
CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECCOMP_MODE_FILTER = 2

# Capabilities (capability.h) and capset(2)'s header version.
CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN, CAP_SETFCAP = 6, 7, 21, 31
LINUX_CAPABILITY_VERSION_3 = 0x2008_0522
# Securebits, each with its lock: no root privilege by uid 0 (NOROOT), none kept or dropped by a uid change
# (NO_SETUID_FIXUP: the sets are emptied by hand), KEEP_CAPS off, no ambient raise: a task cannot regain any.
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80

# mount(2) flags, and the new mount API's (open_tree, move_mount, mount_setattr).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x4_0000
AT_FDCWD = -100
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# Syscalls added since Linux 5.2 have one number on every architecture.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442

# Sockets and interfaces: ctypes, not the socket module's import.
AF_INET, SOCK_DGRAM = 2, 2
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """A part of a sandbox could not be set up; the message names the step."""


def check(result: int, what: str) -> int:
    """`result` of a libc call, unless it failed (negative): then SandboxError, naming `what` and the errno."""
    if result < 0:
        number = ctypes.get_errno()
        raise SandboxError(number, f"{what}: {os.strerror(number)}")
    return result


def write_file(path: str, text: str) -> None:
    """Write `text` to a kernel file (/proc, cgroupfs) in one write(2): the kernel takes such a value whole, once."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def prctl(option: int, value: int) -> None:
    """prctl(option, value), checked."""
    check(libc.prctl(option, value, 0, 0, 0), f"prctl({option}, {value})")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


@contextlib.contextmanager
def while_dumpable() -> Iterator[None]:
    """This process dumpable for the block, then as it was: its /proc/self is then its own (a uid change made it
    root's) and its ptrace access mode lets its user reach it, e.g. to write its id maps or setns by its pidfd."""
    dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    prctl(PR_SET_DUMPABLE, 1)
    try:
        yield
    finally:
        libc.prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)

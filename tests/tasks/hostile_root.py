"""Tasks that try what a root task could do with capabilities (tests/test_privileges.py): each uses arguments that
fail before any effect, so that a refusal (EPERM, EROFS, ENOENT) is told apart from what the kernel would do."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
PR_GET_SECUREBITS = 27
ADJ_TICK = 0x4000


def _errno_of(call: Any) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno or 0
    return 0


def what_root_can_do(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    status = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    caps = {name: int(status[name].strip(), 16) for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    # adjtimex with ADJ_TICK and a tick out of range: EPERM without CAP_SYS_TIME, EINVAL with it (no change).
    timex = ctypes.create_string_buffer(struct.pack("I", ADJ_TICK), 208)
    adjtimex = 0 if _libc.adjtimex(timex) >= 0 else ctypes.get_errno()
    opened = {}
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger",
                 "/dev/kmsg", "/dev/userfaultfd", "/dev/mem", "/dev/sda"):
        # O_WRONLY without O_TRUNC: opening changes nothing, and the descriptor is closed unused.
        opened[path] = _errno_of(lambda path=path: os.close(os.open(path, os.O_WRONLY)))
    opened["/dev/kmsg (read)"] = _errno_of(lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY)))
    through_init = {}
    own_root = os.stat("/")
    for entry in ("root", "cwd"):
        try:
            seen = os.stat(f"/proc/1/{entry}/")
            through_init[entry] = "own" if (seen.st_dev, seen.st_ino) == (own_root.st_dev, own_root.st_ino) else "other"
        except OSError as exc:
            through_init[entry] = os.strerror(exc.errno or 0)
    for entry in ("environ", "mem"):
        try:
            os.close(os.open(f"/proc/1/{entry}", os.O_RDONLY))
            through_init[entry] = "opened"
        except OSError as exc:
            through_init[entry] = os.strerror(exc.errno or 0)
    try:
        through_init["fd"] = os.listdir("/proc/1/fd")  # each would need ptrace access to open
    except OSError as exc:
        through_init["fd"] = os.strerror(exc.errno or 0)
    return True, {
        "uid": os.getuid(), "caps": caps, "securebits": _libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0),
        "adjtimex": adjtimex, "opened": opened, "through_init": through_init, "dev": sorted(os.listdir("/dev")),
        "mnt": os.readlink("/proc/self/ns/mnt"), "pid_ns": os.readlink("/proc/self/ns/pid"),
        "mounts": Path("/proc/self/mountinfo").read_text(), "user_ns": os.readlink("/proc/self/ns/user"),
        "uid_map": Path("/proc/self/uid_map").read_text().split(),
    }


def rootless_view(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """What a task of a daemon run by an ordinary user sees of its sandbox (tests/test_rootless.py)."""
    status = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    tmp = next(line.split() for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1] == "/tmp")
    Path(options["mark"]).write_text("written by a task")  # in its writable path: whose is it on the host?
    ctypes.set_errno(0)
    ptrace = _libc.syscall(options["ptrace"], 0, 0, 0, 0)  # PTRACE_TRACEME: refused by the filter
    return True, {
        "uid": os.getuid(), "uid_map": Path("/proc/self/uid_map").read_text().split(), "pid": os.getpid(),
        "pids": sorted(int(name) for name in os.listdir("/proc") if name.isdigit()),
        "cap_eff": int(status["CapEff"], 16), "cap_bnd": int(status["CapBnd"], 16),
        "tmp": tmp[2], "interfaces": sorted(os.listdir("/sys/class/net")),
        "ptrace": ctypes.get_errno() if ptrace == -1 else 0, "dev": sorted(os.listdir("/dev")),
    }

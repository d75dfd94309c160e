"""The daemon's own user namespace, for a daemon given CAP_SETUID and CAP_SETGID but not CAP_SYS_ADMIN.

Such a daemon (the systemd unit's, a Kubernetes pod's default capabilities) cannot make a mount or network
namespace in the host's user namespace. So, at start, before it starts any thread, it moves into a user
namespace of its own whose map (written by a child forked before, which stays outside) holds exactly the ids
its tasks need, each to itself, and its own uid as root:

    0 DAEMON_UID 1        the daemon's root there is its own user here: nothing more of the host is its
    OWNER OWNER 1         run_as_user, and its group
    FIRST FIRST COUNT     the task uids it claimed

There it holds every capability, but over nothing the host does not map to it: it makes each task's
namespaces, mounts and per-task uids as a root daemon does, and the kernel keeps it from every file, process
and device of an id it was not given. A root daemon with CAP_SYS_ADMIN, or an ordinary user's (which the fork
server maps itself, task_runner.server.sandbox.own_user_namespace), needs none of this.
"""

from __future__ import annotations

import ctypes
import os

CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN, CAP_SETFCAP = 6, 7, 21, 31
CLONE_NEWUSER = 0x1000_0000
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
Extent = tuple[int, int, int]  # (first id inside, first id outside, count): one line of a uid or gid map
_libc = ctypes.CDLL(None, use_errno=True)


def effective_capabilities() -> int:
    """This process's effective capability set, as a bit mask."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("CapEff:")).split()[1], 16)


def maps_its_own() -> bool:
    """Whether this daemon must make its own user namespace to sandbox its tasks, and may: it has CAP_SETUID and
    CAP_SETGID but is not root with CAP_SYS_ADMIN (mapping its root to uid 0 also takes CAP_SETFCAP)."""
    caps = effective_capabilities()
    root = os.geteuid() == 0
    if root and caps >> CAP_SYS_ADMIN & 1:
        return False
    return bool(caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1 and (not root or caps >> CAP_SETFCAP & 1))


def extents(own: int, also: list[tuple[int, int]]) -> list[Extent]:
    """A map of `own` as root and each (first, count) of `also` to itself, leaving out what `own` already is."""
    lines: list[Extent] = [(0, own, 1)]
    for first, count in also:
        if not first <= own < first + count and not any(b <= first < b + c for _, b, c in lines):
            lines.append((first, first, count))
    return lines


def inside(kind: str, host_id: int) -> int:
    """What the host's uid or gid (`kind`: "uid" or "gid") is in our user namespace (itself in the host's);
    -1 stays -1 (chown's "unchanged").

    Raises:
        OSError: it is not mapped here (EINVAL, as chown would say).
    """
    if host_id == -1:
        return -1
    with open(f"/proc/self/{kind}_map") as f:
        for line in f:
            first, lower, count = map(int, line.split())
            if lower <= host_id < lower + count:
                return first + host_id - lower
    raise OSError(22, f"{kind} {host_id} is not mapped into the daemon's user namespace")


def enter(uids: list[Extent], gids: list[Extent]) -> None:
    """Move this process (single-threaded) into a new user namespace mapped as given.

    Raises:
        OSError: naming what the kernel refused.
    """
    ready_r, ready_w = os.pipe()
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    # Dumpable while mapped: the map files of a process that is not are root's, which the writer is not.
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    writer = os.fork()
    if writer == 0:  # stays in the host's namespace, where CAP_SETUID and CAP_SETGID let it write any map
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1):
                for name, lines in (("uid_map", uids), ("gid_map", gids)):
                    _write(f"/proc/{os.getppid()}/{name}", "".join(f"{a} {b} {c}\n" for a, b, c in lines))
                code = 0
        except OSError as exc:
            os.write(2, f"task-runner: cannot map the daemon's user namespace: {exc}\n".encode())
        os._exit(code)
    os.close(ready_r)
    try:
        try:
            if _libc.unshare(CLONE_NEWUSER) != 0:
                number = ctypes.get_errno()
                raise OSError(number, f"unshare(CLONE_NEWUSER): {os.strerror(number)}")
            os.write(ready_w, b"1")
        finally:
            os.close(ready_w)
            _, status = os.waitpid(writer, 0)
        if status != 0:
            raise OSError(f"the uid map {uids} or gid map {gids} was refused (see above)")
    finally:
        _libc.prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())  # one write: the kernel takes a map whole, once
    finally:
        os.close(fd)

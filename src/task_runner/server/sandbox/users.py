"""Users and capabilities: a task's own user namespace, no capability left to it, and the daemon's own namespace.

A task process whose sandbox has a filesystem, process or network part moves into a user namespace of its own
(`task_user_namespace`) that maps its uid alone; there, and everywhere, it keeps no capability
(`lock_privileges`, `drop_capabilities`). An ordinary user's fork server is root in a user namespace of its own
(`own_user_namespace`), so that it can set up every part of a sandbox.

A daemon given CAP_SETUID and CAP_SETGID but not CAP_SYS_ADMIN (the systemd unit's, a Kubernetes pod's default
capabilities) cannot make a mount or network namespace in the host's user namespace. So, at start, before it
starts any thread, it moves into a user namespace of its own (`enter`) whose map (written by a child forked
before, which stays outside) holds exactly the ids its tasks need, each to itself, and its own uid as root:

    0 DAEMON_UID 1        the daemon's root there is its own user here: nothing more of the host is its
    OWNER OWNER 1         run_as_user, and its group
    FIRST FIRST COUNT     the task uids it claimed

There it holds every capability, but over nothing the host does not map to it: it makes each task's
namespaces, mounts and per-task uids as a root daemon does, and the kernel keeps it from every file, process
and device of an id it was not given. A root daemon with CAP_SYS_ADMIN, or an ordinary user's, needs none of this.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from task_runner.server.sandbox.libc import (
    CAP_SETFCAP,
    CAP_SETGID,
    CAP_SETUID,
    CAP_SYS_ADMIN,
    CLONE_NEWUSER,
    LINUX_CAPABILITY_VERSION_3,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_SECUREBITS,
    SECUREBITS_LOCKED,
    SandboxError,
    check,
    libc,
    unshare,
    while_dumpable,
    write_file,
)

Extent = tuple[int, int, int]  # (first id inside, first id outside, count): one line of a uid or gid map


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
    raise OSError(errno.EINVAL, f"{kind} {host_id} is not mapped into the daemon's user namespace")


def enter(uids: list[Extent], gids: list[Extent]) -> None:
    """Move this process (single-threaded) into a new user namespace mapped as given.

    Raises:
        OSError: naming what the kernel refused.
    """
    ready_r, ready_w = os.pipe()
    # Dumpable while mapped: the map files of a process that is not are root's, which the writer is not.
    with while_dumpable():
        writer = os.fork()
        if writer == 0:  # stays in the host's namespace, where CAP_SETUID and CAP_SETGID let it write any map
            code = 1
            try:
                os.close(ready_w)
                if os.read(ready_r, 1):
                    for name, lines in (("uid_map", uids), ("gid_map", gids)):
                        write_file(f"/proc/{os.getppid()}/{name}", "".join(f"{a} {b} {c}\n" for a, b, c in lines))
                    code = 0
            except OSError as exc:
                os.write(2, f"task-runner: cannot map the daemon's user namespace: {exc}\n".encode())
            os._exit(code)
        os.close(ready_r)
        try:
            check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
            os.write(ready_w, b"1")
        finally:
            os.close(ready_w)
            _, status = os.waitpid(writer, 0)
        if status != 0:
            raise OSError(f"the uid map {uids} or gid map {gids} was refused (see above)")


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
    with while_dumpable():
        unshare(CLONE_NEWUSER)
        _write_id_maps(f"{uid} {uid} 1", f"{gid} {gid} 1")


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
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            check(-1, f"prctl(PR_CAPBSET_DROP, {capability})")
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")


def drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets: with lock_privileges' bounding set and securebits, a
    task, root or not, is then root by uid alone, with no capability and none to regain."""
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, bytes(24)), "capset")  # two struct __user_cap_data_struct, all zero


def no_new_privs() -> None:
    """Set-user-ID and file capabilities never raise what this process or its descendants may do."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _write_id_maps(uid_map: str, gid_map: str) -> None:
    """Map this process's new user namespace; setgroups is denied first, as the kernel asks of a one-line map."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        write_file(f"/proc/self/{name}", text)

"""Hostile tasks against the uid promises: leftovers that outlive their task, set-user-ID plants, squatted claims.

Registered by the tests that use them (tests/test_uid_promises.py), not by the shared daemon.
"""

import os
import shutil
import signal
import socket
import time
from pathlib import Path


def leave_chain(options):
    """Leave options["depth"] processes behind, each the child of the last and in a session of its own, then return.

    Returns the pids of the chain and this process's uid, once every link is running.
    """
    depth = options.get("depth", 250)
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        try:
            for _ in range(depth):
                os.setsid()
                os.write(write_end, f"{os.getpid()}\n".encode())
                if os.fork() != 0:
                    break  # this link stays; its child forks the next one
            else:
                os.write(write_end, b"done\n")
            os.close(read_end)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    os.close(write_end)
    lines: list[str] = []
    buffered = b""
    while "done" not in lines:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        buffered += chunk
        *whole, buffered = buffered.split(b"\n")
        lines += [line.decode() for line in whole]
    pids = [int(line) for line in lines if line != "done"]
    return True, {"uid": os.getuid(), "pids": pids}


def others_of_my_uid(options):
    """Who else runs under this process's uid: the kernel's count says (with RLIMIT_NPROC at 2, a fork
    succeeds only if this is the uid's only process); /proc names them."""
    import resource

    uid = os.getuid()
    resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
    try:
        pid = os.fork()
    except BlockingIOError:
        alone = False
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        alone = True
    names = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                status = Path(f"/proc/{entry.name}/status").read_text()
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            if str(uid) in uids:
                names.append(int(entry.name))
    return True, {"uid": uid, "alone": alone, "pids": names}


def plant_setuid(options):
    """Leave a set-user-ID copy of `id` (owned by this uid) where other tasks can run it."""
    planted = Path(options["dir"]) / f"id-{os.getuid()}"
    shutil.copy(shutil.which("id") or "/usr/bin/id", planted)
    os.chmod(planted, 0o4755)
    return True, {"uid": os.getuid(), "path": str(planted)}


def run_planted(options):
    """Run what another task planted: whose uid does it run as?"""
    import subprocess

    ran = subprocess.run([options["path"], "-u"], capture_output=True, text=True, check=True)
    no_new_privs = next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("NoNewPrivs:")).split()[1]
    return True, {"uid": os.getuid(), "ran_as": int(ran.stdout), "no_new_privs": no_new_privs == "1"}


def squat_claims(options):
    """Try to take or block every uid claim a daemon could make, then hold on for options["s"] seconds.

    The old claims were abstract unix socket names anyone could bind; the claims directory must
    be closed to tasks.
    """
    # Each process may hold only so many descriptors: helpers hold a share of the names each, for the task's life.
    read_end, write_end = os.pipe()
    helpers = 8
    for helper in range(helpers):
        if os.fork() == 0:
            held = []
            for block in range(helper, 4096, helpers):
                first = 0x7000_0000 + block * 4096
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                except OSError:
                    break
                try:
                    sock.bind(f"\0isolated-task-runner/uids/{first}-{first + 4095}")
                except OSError:
                    sock.close()
                else:
                    held.append(sock)
            os.write(write_end, f"{len(held)}\n".encode())
            while True:
                signal.pause()
    os.close(write_end)
    counts = b""
    while counts.count(b"\n") < helpers:
        counts += os.read(read_end, 4096)
    bound = sum(int(n) for n in counts.split())
    tried = {}
    directory = options["claims"]
    for what, attempt in (
        ("list", lambda: os.listdir(directory)),
        ("create", lambda: open(os.path.join(directory, "1879048192-1879052287"), "w").close()),
        ("lock", lambda: open(os.path.join(directory, ".lock")).close()),
    ):
        try:
            attempt()
            tried[what] = "done"
        except OSError as exc:
            tried[what] = type(exc).__name__
    Path(options["ready"]).write_text(f"{bound}\n")
    time.sleep(options.get("s", 30))
    return True, {"bound": bound, "tried": tried}


def read_others_proc(options):
    """What this task can read of process options["pid"] in /proc."""
    seen = {}
    for name in ("cmdline", "status", "environ", "mem", "fd"):
        path = f"/proc/{options['pid']}/{name}"
        try:
            if name == "fd":
                os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(1)
            seen[name] = True
        except OSError:
            seen[name] = False
    return True, seen

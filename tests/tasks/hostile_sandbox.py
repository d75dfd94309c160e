"""Hostile tasks against the sandbox: leftovers in /tmp and IPC, full disks, neighbours, the network, the kernel.

Registered by the tests that use them (tests/test_sandbox.py), not by the shared daemon.
"""

import ctypes
import errno
import fcntl
import os
import socket
import subprocess
import time

from task_runner import task

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
IPC_CREAT, IPC_RMID = 0o1000, 0
PLACES = ("/tmp", "/var/tmp", "/dev/shm")


def leave_everything(options):
    """Leave a file in each of /tmp, /var/tmp and /dev/shm, a System V shared memory segment (128 MiB),
    a System V message queue and a POSIX message queue, each named by options["key"]."""
    key = options["key"]
    made = {}
    for place in PLACES:
        with open(f"{place}/left-{key}", "w") as f:
            f.write("secret")
        os.chmod(f"{place}/left-{key}", 0o666)
        made[place] = True
    _libc.shmget.restype = ctypes.c_int
    made["shm"] = _libc.shmget(key, 128 << 20, IPC_CREAT | 0o666) >= 0
    made["msg"] = _libc.msgget(key, IPC_CREAT | 0o666) >= 0
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    made["mq"] = rt.mq_open(f"/left-{key}".encode(), os.O_CREAT | os.O_RDWR, 0o666, None) >= 0
    return True, made


def find_leftovers(options):
    """What of leave_everything's (same key) this task can find."""
    key = options["key"]
    found = [place for place in PLACES if os.path.exists(f"{place}/left-{key}")]
    if _libc.shmget(key, 0, 0) >= 0:
        found.append("shm")
    if _libc.msgget(key, 0) >= 0:
        found.append("msg")
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    if rt.mq_open(f"/left-{key}".encode(), os.O_RDONLY, 0, None) >= 0:
        found.append("mq")
    with open("/proc/sysvipc/shm") as f:
        segments = len(f.readlines()) - 1
    return True, {"found": found, "segments_in_sight": segments}


def fill(options):
    """Write to each private place until the disk is full; how much each took."""
    written = {}
    chunk = b"x" * (1 << 20)
    for place in options.get("places", PLACES):
        total = 0
        try:
            with open(f"{place}/fill-{os.getpid()}-{time.monotonic_ns()}", "wb") as f:
                while total < options.get("most", 1 << 40):
                    total += f.write(chunk)
                    f.flush()
        except OSError as exc:
            written[place] = {"bytes": total, "errno": exc.errno}
        else:
            written[place] = {"bytes": total, "errno": 0}
    return True, written


def write_some(options):
    """Write options["mib"] MiB to /tmp; whether it could."""
    try:
        with open("/tmp/some", "wb") as f:
            f.write(b"y" * (options["mib"] << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return False, {"errno": exc.errno}
    return True, {"cwd": os.getcwd(), "tmpdir": os.environ.get("TMPDIR")}


def run_out_of_tmp(options):
    """Fill /tmp and let the error escape."""
    with open("/tmp/big", "wb") as f:
        while True:
            f.write(b"z" * (1 << 20))
            f.flush()


def serve_neighbour(options):
    """Listen on an abstract unix socket and on loopback TCP, say so, and wait for a neighbour to connect."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(b"\0" + options["name"].encode())
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", options["port"]))
    tcp.listen()
    task.progress(0.5, "listening")
    unix.settimeout(options.get("wait_s", 3))
    tcp.settimeout(0.1)
    accepted = []
    for sock, what in ((unix, "unix"), (tcp, "tcp")):
        try:
            sock.accept()[0].close()
            accepted.append(what)
        except OSError:
            pass
    return True, {"accepted": accepted, "marker": options["name"]}


def call_neighbour(options):
    """Try to connect to serve_neighbour's sockets; what each attempt gave."""
    tried = {}
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.connect(b"\0" + options["name"].encode())
        tried["unix"] = "connected"
    except OSError as exc:
        tried["unix"] = errno.errorcode.get(exc.errno or 0, str(exc))
    for port_name in ("port", "daemon_port"):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.settimeout(2)
        try:
            tcp.connect(("127.0.0.1", options[port_name]))
            tried[port_name] = "connected"
        except OSError as exc:
            tried[port_name] = errno.errorcode.get(exc.errno or 0, str(exc))
        finally:
            tcp.close()
    return True, tried


def look_around(options):
    """What this task sees: its pid, every process in /proc (and their command lines), its network."""
    pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    cmdlines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    with open("/proc/net/route") as f:
        routes = [line.split()[:2] for line in f.readlines()[1:]]
    with open("/proc/net/ipv6_route") as f:
        routes6 = [line.split()[-1] for line in f.readlines()]
    with open("/proc/net/dev") as f:
        interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return True, {"pid": os.getpid(), "pids": pids, "cmdlines": cmdlines, "routes": routes, "routes6": routes6,
                  "interfaces": interfaces, "lo_up": _is_up("lo"), "marker": options.get("marker", "")}


def _is_up(name):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = name.encode().ljust(16, b"\0") + bytes(24)
        flags = int.from_bytes(fcntl.ioctl(sock, 0x8913, request)[16:18], "little")  # SIOCGIFFLAGS
        return bool(flags & 1)


def see_files(options):
    """Which of options["paths"] this task can read (and what), and which it can write to."""
    seen = {}
    for path in options["paths"]:
        entry = {"exists": os.path.exists(path)}
        if os.path.isdir(path):
            entry["listing"] = sorted(os.listdir(path))
        elif entry["exists"]:
            try:
                with open(path, "rb") as f:
                    entry["content"] = f.read(100).decode(errors="replace")
            except OSError as exc:
                entry["content_errno"] = exc.errno
        try:
            target = os.path.join(path, "written") if os.path.isdir(path) else path + ".written"
            with open(target, "w") as f:
                f.write("x")
            entry["writable"] = True
        except OSError as exc:
            entry["writable"] = False
            entry["write_errno"] = exc.errno
        seen[path] = entry
    return True, seen


def refused_syscalls(options):
    """Each named syscall (by number, from options) called with harmless arguments: the errno it gave."""
    gave = {}
    for name, number in options["numbers"].items():
        ctypes.set_errno(0)
        result = _libc.syscall(number, 0, 0, 0, 0, 0, 0)
        gave[name] = ctypes.get_errno() if result == -1 else 0
    clone_new_user = _libc.syscall(options["clone"], 0x1000_0000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
    gave["clone(CLONE_NEWUSER)"] = ctypes.get_errno() if clone_new_user == -1 else 0
    if clone_new_user == 0:  # it worked (it must not): this is the child
        os._exit(0)
    with open("/proc/self/status") as f:
        gave["seccomp_mode"] = next(int(line.split()[1]) for line in f if line.startswith("Seccomp:"))
    # What tasks do keeps working: threads, a child, a program.
    gave["program"] = subprocess.run(["/bin/echo", "7"], capture_output=True).stdout.decode()
    return True, gave


def pid_one(options):
    """Leave children (in sessions of their own, with a grandchild each) holding a shared lock on
    options["lock"], say so, then wait for the notice and answer."""
    read_end, write_end = os.pipe()
    for _ in range(3):
        if os.fork() == 0:
            os.setsid()
            lock = os.open(options["lock"], os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_SH)
            if os.fork() == 0:  # the grandchild shares the lock (the same open file)
                time.sleep(600)
            os.write(write_end, b"+")
            time.sleep(600)
            os._exit(0)
    os.close(write_end)
    held = b""
    while len(held) < 3:
        held += os.read(read_end, 3)
    task.progress(0.5, "children left")
    while not task.cancelled():
        time.sleep(0.005)
    return True, {"pid": os.getpid(), "noticed": True}

"""Test tasks: every way a task can answer, fail or misbehave.

Tasks that leave processes behind record them, one per line, in options["pidfile"], so the tests can
check that every one of them is gone (in a pid namespace of the task's own, too: see `_record`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

STATE = {"touched": False}


def _identity(pid: int) -> str:
    """A process as any pid namespace can find it: its pid here, this pid namespace, its start time."""
    with open(f"/proc/{pid}/stat") as f:
        started = f.read().rsplit(")", 1)[1].split()[19]
    return f"{pid} {os.readlink('/proc/self/ns/pid')} {started}"


def _record(options: dict[str, Any], *pids: int) -> None:
    """Record processes (tests.conftest.read_pids finds them from outside, whatever their pid namespace)."""
    with open(options["pidfile"], "a") as f:
        f.write("".join(f"{_identity(pid)}\n" for pid in pids))
        f.flush()
        os.fsync(f.fileno())


def echo(options):
    """Return the options."""
    return True, {"options": options}


def reject(options):
    """Answer outcome false."""
    return False, {"why": "deterministic"}


def bare_true(options):
    return True


def raise_now(options):
    """Raise while running."""
    raise ValueError("raised while running")  # the test finds this line by its text


def callback_error_later(options, callback):
    """Pass an error to the callback, later, from another thread."""
    threading.Timer(0.02, callback, args=(RuntimeError("passed to the callback"),)).start()


def callback_later(options, callback):
    threading.Timer(0.02, callback, args=(None, True, {"late": True})).start()


def callback_twice(options, callback):
    callback(None, True, {"call": 1})
    callback(None, False, {"call": 2})


def callback_then_hang(options, callback):
    def answer_then_spin():
        callback(None, True, {"answered": True})
    threading.Thread(target=answer_then_spin).start()
    while True:
        time.sleep(1)


def callback_never(options, callback):
    """Return without ever calling the callback."""


def thread_error(options):
    def boom():
        raise KeyError("raised in a thread")
    threading.Thread(target=boom).start()
    time.sleep(10)
    return True


async def asyncio_callback_error(options):
    def boom():
        raise LookupError("raised in an asyncio callback")
    asyncio.get_running_loop().call_soon(boom)
    await asyncio.sleep(10)
    return True


async def async_echo(options):
    await asyncio.sleep(0)
    return True, {"options": options, "async": True}


def sleep(options):
    time.sleep(options.get("ms", 100) / 1e3)
    return True, {}


def write_pid_and_sleep(options):
    _record(options, os.getpid())
    time.sleep(options.get("s", 30))
    return True


def stubborn_tree(options):
    """Ignore SIGTERM, spawn grandchildren (one in its own session, one ignoring SIGTERM), and spin."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spin = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass"
    plain = subprocess.Popen([sys.executable, "-c", spin])
    session = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    # A grandchild of a grandchild, orphaned at once: double fork into a new session.
    daemonize = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "started = open(f'/proc/{p.pid}/stat').read().rsplit(')', 1)[1].split()[19]\n"
        f"open({options['pidfile']!r}, 'a').write(f'{{p.pid}} {{os.readlink(\"/proc/self/ns/pid\")}} {{started}}\\n')\n"
    )
    subprocess.run([sys.executable, "-c", daemonize], check=True)
    _record(options, os.getpid(), plain.pid, session.pid)
    while True:
        pass


def exit_hard(options):
    os._exit(1)


def sys_exit(options):
    sys.exit(3)


def segfault(options):
    ctypes.string_at(0)


def kill_self(options):
    os.kill(os.getpid(), signal.SIGKILL)


def big_output(options):
    """Write options["mb"] MiB to stdout and a little to stderr."""
    chunk = b"x" * (1 << 20)
    for _ in range(options.get("mb", 100)):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.write(b"THE END\n")
    sys.stderr.write("to stderr\n")
    return True, {}


def big_result(options):
    return True, {"data": "y" * (options.get("mb", 2) << 20)}


def set_result(options):
    return True, {"a": {1, 2}}


def datetime_result(options):
    return True, {"when": datetime.datetime(2026, 1, 1)}


def huge_int_result(options):
    return True, {"n": 2**60}


def outcome_yes(options):
    return "yes", {}


def touch_state(options):
    """Change module state: the next task must not see it."""
    before = STATE["touched"]
    STATE["touched"] = True
    return True, {"before": before}


def environment(options):
    return True, {"env": dict(os.environ), "cwd": os.getcwd()}


def open_fds(options):
    return True, {"fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))}


def print_then_answer(options):
    print("hello from the task")
    print("and from stderr", file=sys.stderr)
    return True, {}


def close_stdio(options):
    sys.stdout.close()
    os.close(1)
    os.close(2)
    return True, {"closed": True}


def fork_bomb(options):
    """Fork children that fork, for a bounded number of generations, then hang; pids to options["pidfile"]."""
    _record(options, os.getpid())
    for _ in range(options.get("width", 4)):
        if os.fork() == 0:
            for _ in range(options.get("depth", 3)):
                if os.fork() != 0:
                    break
            _record(options, os.getpid())
            time.sleep(600)
            os._exit(0)
    time.sleep(600)


def fork_and_count(options):
    """Fork sleeping children until the kernel refuses one (at most options["most"]); how many it got."""
    got = 0
    for _ in range(options.get("most", 400)):
        try:
            pid = os.fork()
        except OSError as exc:
            return True, {"forked": got, "refused": errno.errorcode.get(exc.errno, str(exc.errno))}
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        got += 1
    return True, {"forked": got, "refused": None}


def write_cwd(options):
    Path("scratch.txt").write_text("scratch")
    return True, {"cwd": os.getcwd()}


def allocate(options):
    """Allocate options["mb"] MiB and touch it."""
    block = bytearray(options["mb"] << 20)
    return True, {"allocated": len(block)}


def spin(options):
    while True:
        pass


def write_file(options):
    """Write options["mb"] MiB into a file in the working directory."""
    with open("big.bin", "wb") as f:
        for _ in range(options["mb"]):
            f.write(b"z" * (1 << 20))
    return True, {}


def open_many(options):
    files = [open(os.devnull) for _ in range(options.get("n", 100_000))]  # noqa: SIM115
    return True, {"opened": len(files)}


def fork_until_refused(options):
    """Fork sleeping children until the process limit refuses (the children are left behind)."""
    while True:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)


def delete_cwd(options):
    import shutil

    shutil.rmtree(os.getcwd())
    return True, {}


def oom_scores(options):
    """The OOM killer's adjustment of this process and of a child of it."""
    done = subprocess.run(["cat", "/proc/self/oom_score_adj"], capture_output=True, text=True, check=True)
    return True, {"own": Path("/proc/self/oom_score_adj").read_text().strip(), "child": done.stdout.strip()}


def whoami(options):
    cwd = os.getcwd()
    return True, {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": cwd,
                  "entries": os.listdir(cwd), "mode": oct(os.stat(cwd).st_mode & 0o777)}


def find_secrets(options):
    """Search the environment, open descriptors and this process's own memory for secrets.

    Each secret is described by a short prefix, its length and its sha256, so that this task
    never holds the secret itself unless it is really there to be found.
    """
    import hashlib
    import re

    found = []
    env_blob = "\n".join(f"{k}={v}" for k, v in os.environ.items()).encode()
    fd_targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fd_targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    memory = []
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if "r" not in line.split()[1] or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                memory.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    for secret in options["secrets"]:
        prefix, length, digest = secret["prefix"].encode(), secret["length"], secret["sha256"]
        for blob_name, blob in [("environment", env_blob), *(("memory", m) for m in memory)]:
            for match in re.finditer(re.escape(prefix), blob):
                candidate = blob[match.start():match.start() + length]
                if hashlib.sha256(candidate).hexdigest() == digest:
                    found.append(f"{secret['name']} in {blob_name}")
                    break
        for target in fd_targets:
            if secret.get("path") and secret["path"] in target:
                found.append(f"{secret['name']} as an open descriptor")
    return True, {"found": sorted(set(found)), "scanned_bytes": sum(map(len, memory)), "fds": fd_targets}


def my_cgroup(options):
    with open("/proc/self/cgroup") as f:
        return True, {"cgroup": next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))}


def count_runs(options):
    """Append a line to options["file"] per run, wait options["ms"], answer with a fresh random token."""
    with open(options["file"], "a") as f:
        f.write("run\n")
    time.sleep(options.get("ms", 0) / 1e3)
    return True, {"token": os.urandom(8).hex()}


def flaky(options):
    """Fail until it has run options["fail_times"] times (counted in options["file"])."""
    with open(options["file"], "a+") as f:
        f.seek(0)
        runs = len(f.read().split())
        f.write("run\n")
    if runs < options["fail_times"]:
        raise ConnectionError(f"flaky failure {runs + 1}")
    return True, {"runs": runs + 1}


def abort(options):
    os.abort()


def answer_then_linger(options):
    """Write a valid answer straight to the answer channel, then go on running."""
    import struct

    from task_runner.v1.task_runner_pb2 import PerformResponse

    _record(options, os.getpid())
    payload = PerformResponse(outcome=True).SerializeToString()
    os.write(3, struct.pack("!I", len(payload) + 1) + b"A" + payload)  # an answer frame, as task_runner.frames has it
    time.sleep(600)


def map_memory(options):
    """Map options["mb"] MiB of anonymous memory (shared or private, per options["shared"]) and touch it."""
    import mmap

    flags = (mmap.MAP_SHARED if options.get("shared", True) else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    block = mmap.mmap(-1, options["mb"] << 20, flags=flags)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return True, {"mapped": len(block)}


def threads_until_refused(options):
    """Start sleeping threads until the system refuses one."""
    threads = []
    while True:
        thread = threading.Thread(target=time.sleep, args=(600,), daemon=True)
        thread.start()
        threads.append(thread)


def spin_ignoring_sigxcpu(options):
    """Ignore SIGXCPU (the soft CPU limit's warning) and spin on, into the hard limit."""
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    while True:
        pass


def forge_answer(options):
    """Write an answer frame claiming an error kind only the runner may give (options["kind"])."""
    import struct

    from task_runner.v1.task_runner_pb2 import PerformResponse

    response = PerformResponse()
    response.error.kind = options["kind"]
    response.error.message = "forged by the task"
    response.error.signal = 9
    payload = response.SerializeToString()
    os.write(3, struct.pack("!I", len(payload) + 1) + b"A" + payload)  # an answer frame, as task_runner.frames has it
    os._exit(0)


def leave_a_mess(options):
    """Leave a tree options["depth"] levels deep in the working directory: files, links out of it
    (to options["victim"]) and directories of mode 000; then answer, or with options["hang"], record
    the pid and hang."""
    top = os.getcwd()
    sealed = []
    for level in range(options["depth"]):
        os.mkdir("d")
        Path("d", "file").write_text("x")
        if level % 500 == 0:
            os.symlink(options["victim"], "d/link")
        os.chdir("d")
        if level % 700 == 0:
            sealed.append(os.open(".", os.O_RDONLY | os.O_DIRECTORY))
    for fd in sealed:  # sealed once all below them is made (a task, root or not, has no capability to write in them)
        os.fchmod(fd, 0)
        os.close(fd)
    os.chdir(top)
    if options.get("hang"):
        _record(options, os.getpid())
        time.sleep(600)
    return True, {"cwd": top}


def temporary_file(options):
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as f:
        return True, {"tmpdir": os.environ.get("TMPDIR"), "cwd": os.getcwd(), "file": f.name}


def victim(options):
    """Record "pid cwd" in options["pidfile"], keep a secret in the working directory, sleep options["s"]."""
    Path("secret").write_text("the victim's")
    with open(options["pidfile"], "a") as f:
        f.write(f"{os.getpid()} {os.getcwd()}\n")
    time.sleep(options.get("s", 5))
    return True, {"undisturbed": True}


def _probes(pid, cwd):
    """What this process can do to process `pid`: each probe's name -> whether it succeeded."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = {}
    try:
        with open(f"/proc/{pid}/mem", "r+b"):
            done["write its memory"] = True
    except OSError:
        done["write its memory"] = False
    try:
        os.kill(pid, 0)
        done["signal it"] = True
    except OSError:
        done["signal it"] = False
    try:
        pidfd = os.pidfd_open(pid)
        try:
            fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd: take its answer channel
            done["take its descriptor"] = fd >= 0
        finally:
            os.close(pidfd)
    except OSError:
        done["take its descriptor"] = False
    try:
        os.listdir(f"/proc/{pid}/cwd")
        done["list its directory through /proc"] = True
    except OSError:
        done["list its directory through /proc"] = False
    if cwd:
        try:
            entries = os.listdir(cwd)
            done["read its files"] = all(Path(cwd, name).read_bytes() is not None for name in entries)
        except OSError:
            done["read its files"] = False
    return done


def reach_others(options):
    """Try to reach every other task process and spare of the fork server, and options["victim"]."""
    me = os.getpid()
    control = _probes(me, os.getcwd())
    targets = {int(options["victim"]): options["victim_cwd"]}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            with contextlib.suppress(OSError), open(f"/proc/{entry}/status") as f:
                if f"PPid:\t{os.getppid()}\n" in f.read():
                    targets.setdefault(int(entry), "")
    reached = [f"{name} ({pid})" for pid, cwd in targets.items() for name, ok in _probes(pid, cwd).items() if ok]
    return True, {"control": control, "targets": len(targets), "reached": reached}



def log_start(options):
    """Append "LABEL start T" to options["log"] as it starts (T on the monotonic clock); then wait, if
    told to, until the file options["gate"] exists; then append "LABEL end T"."""
    label = options.get("label", "")
    with open(options["log"], "a") as f:
        f.write(f"{label} start {time.monotonic():.6f}\n")
    gate = options.get("gate")
    end = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.002)
    with open(options["log"], "a") as f:
        f.write(f"{label} end {time.monotonic():.6f}\n")
    return True


def chatty(options):
    """Report progress, print to both streams, send a heartbeat; answer with what task_runner.task says."""
    from task_runner import task

    task.progress(0.5, stage="half", k=1)
    print("out-line", flush=True)
    print("err-line", file=sys.stderr, flush=True)
    task.heartbeat(n=1)
    time.sleep(0.2)  # the heartbeat goes out within 50 ms of the progress before it
    return True, {"request_id": task.request_id()}


def gated_progress(options):
    """Report progress, wait for the gate file, report progress again."""
    from task_runner import task

    task.progress(0.1, stage="waiting")
    while not os.path.exists(options["gate"]):
        time.sleep(0.005)
    task.progress(1.0, stage="done")
    time.sleep(0.1)
    return True


def until_cancelled(options):
    """Record its pid and a child's, wait until told to stop, then clean up and answer (outcome false)."""
    from task_runner import task

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _record(options, os.getpid(), child.pid)
    while not task.cancelled():
        time.sleep(0.005)
    left = task.remaining()
    child.kill()
    child.wait()
    return False, {"cleaned": True, "remaining": left}


def ignores_notice(options):
    """Record its pid and a child's, then run on, whatever it is told."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _record(options, os.getpid(), child.pid)
    time.sleep(600)


async def async_until_cancelled(options):
    """An async task whose coroutine is cancelled when it is told to stop: it cleans up and answers."""
    try:
        await asyncio.sleep(600)
    except asyncio.CancelledError:
        return False, {"cleaned": True}
    return True


def remaining_now(options):
    from task_runner import task

    return True, {"remaining": task.remaining()}


def heartbeat_then_hang(options):
    from task_runner import task

    task.heartbeat(step="one")
    time.sleep(600)


def flood(options):
    """Report progress and print as fast as it can for options["s"] seconds."""
    from task_runner import task

    end = time.monotonic() + options.get("s", 2)
    line = "x" * 1000 + "\n"
    i = 0
    while time.monotonic() < end:
        for _ in range(100):
            task.progress(i % 1000 / 1000, stage="flooding", i=i)
            i += 1
        sys.stdout.write(line * 64)
    return True, {"updates": i}


def raw_progress_flood(options):
    """Write progress frames straight to its channel, as fast as it can, for options["s"] seconds (no
    task_runner.task and its rate cap: what a hostile task would do); then answer as usual."""
    import struct

    from task_runner.v1.task_runner_pb2 import PerformEvent

    payload = PerformEvent.Progress(fraction=0.5, stage="raw").SerializeToString()
    frame = (struct.pack("!I", len(payload) + 1) + b"P" + payload) * 256
    end = time.monotonic() + options.get("s", 2)
    sent = 0
    while time.monotonic() < end:
        os.write(3, frame)
        sent += 256
    return True, {"updates": sent}


def who_calls(options):
    """Answer with whose call this is, as task_runner.task says; wait for options["gate"] first, if given."""
    from task_runner import task

    gate, end = options.get("gate"), time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.002)
    return True, {"caller": task.caller(), "request_id": task.request_id()}


def complain_then_raise(options):
    """Write options["lines"] numbered lines to stderr, then raise with options["message_lines"] lines of message."""
    for i in range(options.get("lines", 1)):
        print(f"complaint {i:05d} " + "x" * 40, file=sys.stderr)
    message = "\n".join(f"message line {i:05d}" for i in range(options.get("message_lines", 1)))
    raise RuntimeError(message)


def trace_of(options):
    """Answer with the trace context the task got: its environment's and task_runner.task's."""
    from task_runner import task

    return True, {"env": os.environ.get("TRACEPARENT"), "env_state": os.environ.get("TRACESTATE"),
                  "context": task.trace_context()}

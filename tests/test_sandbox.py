"""The sandbox, attacked with every part on: what a task leaves, fills, reaches, sees and calls stays its own.

Each test is an attack that worked against the daemon before sandboxes (issue "A sandbox of its own for every
task"), written as hostile tasks (tests/tasks/hostile_sandbox.py) against a real daemon over gRPC.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from task_runner.client import Client, Finished, Progress, Security, TaskLimitExceeded
from task_runner.server.sandbox import seccomp
from tests.conftest import open_directory, start_daemon, wait_until
from tests.inprocess import InProcessDaemon

HOSTILE = "tests.tasks.hostile_sandbox"
TASKS = ("leave_everything", "find_leftovers", "fill", "write_some", "run_out_of_tmp", "serve_neighbour",
         "call_neighbour", "look_around", "see_files", "refused_syscalls", "pid_one")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")
EVERY_PART = 'filesystem = "private"\nnetwork = "none"\nprocesses = "private"\nsyscalls = "default"\n'


def config(shared: Path, settings: str = "", sandbox: str = "", tables: str = "") -> str:
    tasks = "".join(f'[tasks.{name}]\ntarget = "{HOSTILE}:{name}"\n' for name in TASKS)
    return (f'run_as_user = "nobody"\ncgroup = "off"\n{settings}'
            f'[sandbox]\n{EVERY_PART}tmp_mb = 16\nwritable = ["{shared}"]\n{sandbox}{tasks}{tables}')


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every task may write to (the sandbox's `writable`): how the tests hand tasks a lock."""
    with open_directory("task-runner-sandbox-", 0o1777) as path:
        yield path


@pytest.fixture
def sandboxed(tmp_path: Path, shared: Path) -> Iterator[InProcessDaemon]:
    with InProcessDaemon(tmp_path / "d", config(shared, "max_running = 4\nspare_processes = 2\n")) as d:
        yield d


def host_has_sysv(key: int, kind: str) -> bool:
    with open(f"/proc/sysvipc/{kind}") as f:
        return any(line.split()[0] == str(key) for line in f.readlines()[1:])


@pytest.mark.parametrize("task_uids", ["auto", "off"])
def test_nothing_a_task_leaves_in_tmp_or_ipc_reaches_a_later_task(tmp_path: Path, shared: Path,
                                                                   task_uids: str) -> None:
    """Files in /tmp, /var/tmp and /dev/shm, 128 MiB of System V shared memory (a memory limit of 64 MiB
    bounds none of it), a System V and a POSIX message queue: each gone with its task, even for later tasks
    of the same uid (task_uids = "off"), and never on the host."""
    key = 0x5A00_0000 + os.getpid() % 0x10000
    text = config(shared, f'task_uids = "{task_uids}"\nmax_running = 2\n[limits]\nmemory_mb = 64\n')
    with InProcessDaemon(tmp_path / "d", text) as d, d.client() as client:
        made = client.call("leave_everything", 10_000, {"key": key}).result
        assert all(made.values()), made  # each was really made, inside the sandbox
        later = [client.call("find_leftovers", 10_000, {"key": key}).result for _ in range(6)]
    for report in later:
        assert report == {"found": [], "segments_in_sight": 0}, report
    for place in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(f"{place}/left-{key}")
    assert not host_has_sysv(key, "shm") and not host_has_sysv(key, "msg")


def test_a_task_fills_only_its_own_private_tmp(sandboxed: InProcessDaemon, shared: Path) -> None:
    """/tmp, /var/tmp and /dev/shm together hold tmp_mb (16 MiB): a task that fills them gets ENOSPC, a task
    beside it and the next ones write as usual, and the host's disks never saw a byte."""
    free_before = shutil.disk_usage("/tmp").free
    with sandboxed.client() as client:
        filled = client.call("fill", 30_000, {"places": ["/tmp", "/var/tmp", "/dev/shm"]}).result
        later = [client.call("write_some", 10_000, {"mib": 12}) for _ in range(3)]
    assert all(entry["errno"] == errno.ENOSPC for entry in filled.values()), filled
    assert sum(entry["bytes"] for entry in filled.values()) <= 16 << 20, filled
    assert filled["/tmp"]["bytes"] >= 15 << 20, filled  # the first place took almost all of it
    for answer in later:
        assert answer.result["cwd"].startswith("/tmp/task-"), answer  # its working directory is on it too
        assert answer.outcome is True and answer.result["tmpdir"] == answer.result["cwd"], answer
    assert shutil.disk_usage("/tmp").free > free_before - (8 << 20)  # nothing of the 16 MiB landed here


def test_a_full_private_tmp_is_said(sandboxed: InProcessDaemon) -> None:
    """ENOSPC from a full private /tmp is the task's LIMIT_EXCEEDED "tmp_mb", with usage.tmp_full and a metric."""
    with sandboxed.client() as client, pytest.raises(TaskLimitExceeded) as raised:
        client.call("run_out_of_tmp", 30_000)
    assert raised.value.limit == "tmp_mb" and "tmp_mb" in str(raised.value)
    assert raised.value.answer is not None and raised.value.answer.usage.tmp_full
    registry = sandboxed.daemon.metrics.registry
    assert registry.get_sample_value("task_runner_tmp_full_total", {"task": "run_out_of_tmp"}) == 1


def test_two_running_tasks_cannot_reach_each_other(sandboxed: InProcessDaemon) -> None:
    """One task listens on an abstract unix socket and on loopback TCP; another, running at the same time,
    can connect to neither, and sees no process of the first (nor of anyone) in /proc."""
    name = f"neighbour-{os.getpid()}"
    port = 40_000 + os.getpid() % 20_000
    listening = threading.Event()
    with sandboxed.client() as client, ThreadPoolExecutor(1) as pool:
        def serve() -> Any:
            for event in client.stream("serve_neighbour", 20_000, {"name": name, "port": port, "wait_s": 3}):
                if isinstance(event, Progress):
                    listening.set()
                if isinstance(event, Finished) and event.result is not None:
                    return event.result.result
            return None
        served = pool.submit(serve)
        assert listening.wait(15)
        tried = client.call("call_neighbour", 10_000, {"name": name, "port": port, "daemon_port": port}).result
        seen = client.call("look_around", 10_000).result
        assert served.result(30) == {"accepted": [], "marker": name}
    assert tried["unix"] == "ECONNREFUSED" and tried["port"] == "ECONNREFUSED", tried
    assert seen["pid"] == 2 and seen["pids"] == [1, 2], seen  # its init and itself, alone in its /proc
    assert not any("serve_neighbour" in line or name in line for line in seen["cmdlines"])


def test_no_connection_leaves_the_task(tmp_path: Path, shared: Path) -> None:
    """The task's network is its own loopback alone, up: no route, no other interface; the host's loopback
    (a listener of this test, the daemon's own TCP port) refuses it, and the listener never hears from it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    daemon = start_daemon(tmp_path / "d", config(shared))
    try:
        daemon_port = int(daemon.tcp.rsplit(":", 1)[1])
        with daemon.client() as client:
            seen = client.call("look_around", 10_000).result
            tried = client.call("call_neighbour", 10_000, {
                "name": "none", "port": listener.getsockname()[1], "daemon_port": daemon_port}).result
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert seen["interfaces"] == ["lo"] and seen["lo_up"], seen
    assert seen["routes"] == [] and set(seen["routes6"]) <= {"lo"}, seen  # nothing routes anywhere but loopback
    assert tried == {"unix": "ECONNREFUSED", "port": "ECONNREFUSED", "daemon_port": "ECONNREFUSED"}, tried
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


def syscall_numbers() -> dict[str, int]:
    """The numbers of the refused syscalls on this machine, as libseccomp knows them."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is not installed")
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    numbers = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in seccomp.REFUSED}
    return {name: number for name, number in numbers.items() if number >= 0}


def test_each_refused_syscall_gets_eperm(sandboxed: InProcessDaemon) -> None:
    """Every syscall of the documented list, and clone with a namespace flag: EPERM, from a filter in force;
    what tasks do (a program, its threads) still works."""
    numbers = syscall_numbers()
    assert {"ptrace", "mount", "bpf", "io_uring_setup", "keyctl", "userfaultfd"} <= numbers.keys()
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    with sandboxed.client() as client:
        gave = client.call("refused_syscalls", 10_000, {
            "numbers": numbers, "clone": lib.seccomp_syscall_resolve_name(b"clone")}).result
    assert gave.pop("seccomp_mode") == 2 and gave.pop("program") == "7\n"
    assert gave == dict.fromkeys([*numbers, "clone(CLONE_NEWUSER)"], errno.EPERM)


def test_the_daemons_secrets_are_hidden_and_the_rest_is_read_only(shared: Path) -> None:
    """The directories of the config, of the token and of a caller's token, and `hide` paths, show empty; the
    host's files are read-only; the task's own places (its /tmp, its /dev/shm, its writable path) are writable."""
    secrets = Path(tempfile.mkdtemp(prefix="task-runner-secrets-", dir="/run"))  # outside the private /tmp
    token_dir = Path(tempfile.mkdtemp(prefix="task-runner-token-", dir="/run"))
    caller_dir = Path(tempfile.mkdtemp(prefix="task-runner-caller-", dir="/run"))
    try:
        (token_dir / "token").write_text("s3cret-token-of-the-test\n")
        (caller_dir / "token").write_text("an-other-callers-s3cret\n")
        text = config(shared, f'[auth]\ntoken_file = "{token_dir / "token"}"\n',
                      sandbox='hide = ["/etc/hostname", "/usr/share/doc"]\n',
                      tables=f'[callers.ops]\ntoken_file = "{caller_dir / "token"}"\ntasks = ["*"]\n')
        daemon = start_daemon(secrets, text)  # its config.toml in `secrets`
        try:
            with Client(daemon.unix, security=Security(token="s3cret-token-of-the-test")) as client:
                paths = [str(secrets), str(token_dir), str(caller_dir), "/etc/hostname", "/usr/share/doc",
                         "/etc/passwd", str(shared), "/tmp", "/dev/shm"]
                seen = client.call("see_files", 10_000, {"paths": paths}).result
        finally:
            assert daemon.stop() == 0, daemon.log_text()
    finally:
        shutil.rmtree(secrets)
        shutil.rmtree(token_dir)
        shutil.rmtree(caller_dir)
    for hidden in (str(secrets), str(token_dir), str(caller_dir), "/usr/share/doc"):
        assert seen[hidden]["listing"] == [] and not seen[hidden]["writable"], (hidden, seen)
    assert os.listdir("/usr/share/doc")  # (it is not empty on the host)
    assert seen["/etc/hostname"].get("content", "") == "" and not seen["/etc/hostname"]["writable"]
    assert "root" in seen["/etc/passwd"]["content"] and seen["/etc/passwd"]["write_errno"] == errno.EROFS
    assert seen[str(shared)]["writable"] and seen["/tmp"]["writable"] and seen["/dev/shm"]["writable"], seen
    assert (shared / "written").exists()  # what it wrote to its writable path is really there


@pytest.fixture
def planters(tmp_path: Path, shared: Path) -> Iterator[InProcessDaemon]:
    tables = "".join(f'[tasks.{name}]\ntarget = "tests.tasks.hostile_uids:{name}"\n'
                     for name in ("plant_setuid", "run_planted"))
    with InProcessDaemon(tmp_path / "p", config(shared, tables=tables)) as d:
        yield d


def test_a_planted_set_user_id_program_gives_no_uid(planters: InProcessDaemon, shared: Path) -> None:
    """A set-user-ID copy of `id`, left in a writable path by one task, runs as the uid of the task that runs it."""
    with planters.client() as client:
        planted = client.call("plant_setuid", 10_000, {"dir": str(shared)}).result
        assert os.stat(planted["path"]).st_mode & 0o4000  # the plant is really set-user-ID
        ran = client.call("run_planted", 10_000, {"path": planted["path"]}).result
    assert ran["no_new_privs"] and ran["uid"] != planted["uid"], (ran, planted)


def test_a_task_in_its_own_pid_namespace_gets_its_notice_and_what_it_left_dies_with_it(
        sandboxed: InProcessDaemon, shared: Path) -> None:
    """In a pid namespace of its own (pid 2, under its init), the task still hears its notice (Cancel with a
    grace) and answers; the children and grandchildren it left, in sessions of their own, die with it (their
    shared lock is let go)."""
    lock = shared / "lock"
    lock.touch(mode=0o644)
    left = threading.Event()
    with sandboxed.client() as client, ThreadPoolExecutor(1) as pool:
        def run() -> Any:
            for event in client.stream("pid_one", 30_000, {"lock": str(lock)}, request_id=f"pid1-{os.getpid()}"):
                if isinstance(event, Progress):
                    left.set()
                if isinstance(event, Finished):
                    return event.result
            return None
        running = pool.submit(run)
        assert left.wait(15)
        with open(lock, "rb") as held:
            with pytest.raises(BlockingIOError):  # its children hold it: they are alive
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert client.cancel(f"pid1-{os.getpid()}", grace_ms=10_000) is True
            finished = running.result(30)
            assert finished is not None and finished.outcome is True, finished
            assert finished.result == {"pid": 2, "noticed": True}

            def free() -> bool:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                return False
            assert wait_until(free, 10), "what the task left outlived it"


def test_list_tasks_shows_each_tasks_sandbox_and_a_task_may_override_it(tmp_path: Path, shared: Path) -> None:
    """[tasks.NAME.sandbox] overrides the [sandbox] table key by key; ListTasks shows what each task gets,
    and the task really gets it (its network namespace is the host's)."""
    tables = ('[tasks.open_look]\ntarget = "tests.tasks.hostile_sandbox:look_around"\n'
              '[tasks.open_look.sandbox]\nnetwork = "host"\n')
    with InProcessDaemon(tmp_path / "d", config(shared, tables=tables)) as d, d.client() as client:
        shown = {task.name: task.sandbox for task in client.tasks()}
        closed = client.call("look_around", 10_000).result
        opened = client.call("open_look", 10_000).result
    assert shown["look_around"] is not None and shown["open_look"] is not None
    assert (shown["look_around"].network, shown["open_look"].network) == ("none", "host")
    assert shown["open_look"].filesystem == "private" and shown["open_look"].tmp_mb == 16
    assert closed["interfaces"] == ["lo"]
    host_interfaces = sorted(name for _, name in socket.if_nameindex())
    assert sorted(opened["interfaces"]) == host_interfaces


def test_a_daemon_installed_under_tmp_still_serves_its_tasks(tmp_path: Path) -> None:
    """Its interpreter, prefix and task modules live under /tmp, which a task's private /tmp would hide: they are
    bound back read-only, so a late import and a subprocess of the interpreter work, and nothing there is
    writable, even for a root task."""
    install = Path(tempfile.mkdtemp(prefix="task-runner-install-", dir="/tmp"))  # as a clone in /tmp would be
    try:
        install.chmod(0o755)
        venv = install / "venv"  # an interpreter under /tmp that finds this one's packages
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(venv.glob("lib/python3*/site-packages"))
        (site / "outer.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
        modules = install / "modules"
        modules.mkdir()
        (modules / "late_module.py").write_text("VALUE = 42\n")
        shutil.copy(Path(__file__).parent / "tasks" / "installed_under_tmp.py", modules / "under_tmp_tasks.py")
        daemon = start_daemon(tmp_path / "d", f'cgroup = "off"\n[sandbox]\n{EVERY_PART}'
                              '[tasks.load_late]\ntarget = "under_tmp_tasks:load_late"\n',
                              env={"PYTHONPATH": f"{modules}:{Path(__file__).parent.parent}"},
                              python=str(venv / "bin" / "python"))
        try:
            with Client(daemon.unix) as client:
                answer = client.call("load_late", 30_000)
            assert answer.result == {"late": 42, "interpreter": "ok", "prefix_seen": True,
                                     "wrote_into_code": False}, answer
        finally:
            assert daemon.stop() == 0, daemon.log_text()
    finally:
        shutil.rmtree(install)

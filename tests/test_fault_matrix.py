"""The fault matrix: every way a task can go wrong, against one running daemon.

Each case checks the answer's kind and message, that nothing of the task is left under the
fork server, and that the next task runs normally; the last test checks that the daemon's own
memory, threads and descriptors stayed steady through all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from task_runner.client import TaskFailed
from tests.conftest import Daemon, read_pids, start_daemon, wait_for_spares, wait_gone, wait_until
from tests.test_contract import leftovers

OK = "OK"
CASES: list[tuple[str, str, dict[str, Any], int, str, str]] = [
    # (id, task, options, timeout_ms, expected kind or OK, a fragment of the message or result)
    ("exception-at-import", "broken_import", {}, 5000, "IMPORT_FAILED", "fails at import"),
    ("exception-while-running", "raise_now", {}, 5000, "EXCEPTION", "raised while running"),
    ("exception-in-thread", "thread_error", {}, 5000, "EXCEPTION", "raised in a thread"),
    ("exception-in-asyncio-callback", "asyncio_callback_error", {}, 5000, "EXCEPTION", "asyncio callback"),
    ("os-exit", "exit_hard", {}, 5000, "CRASHED", "exited with code 1 without answering"),
    ("sys-exit", "sys_exit", {}, 5000, "CRASHED", "exited with code 3 without answering"),
    ("sigsegv", "segfault", {}, 5000, "CRASHED", "killed by SIGSEGV (signal 11)"),
    ("abort", "abort", {}, 5000, "CRASHED", "killed by SIGABRT (signal 6)"),
    ("kill-itself", "kill_self", {}, 5000, "CRASHED", "killed by SIGKILL (signal 9)"),
    ("fork-bomb", "fork_bomb", {"width": 8, "depth": 4, "pidfile": "{tmp}/pids"}, 2000, "TIMEOUT",
     "did not finish within 2000 ms"),
    ("memory-beyond-limit", "allocate", {"mb": 2000}, 20_000, "LIMIT_EXCEEDED", "memory limit"),
    ("cpu-beyond-limit", "spin_1s", {}, 20_000, "LIMIT_EXCEEDED", "cpu_time limit"),
    ("ignores-sigterm-with-grandchildren", "stubborn_tree", {"pidfile": "{tmp}/pids"}, 3000, "TIMEOUT",
     "its process tree was killed"),
    ("callback-never-called", "callback_never", {}, 5000, "CRASHED", "without calling its callback"),
    ("callback-called-twice", "callback_twice", {}, 5000, OK, "'call': 1"),
    ("callback-then-hang", "callback_then_hang", {}, 5000, OK, "'answered': True"),
    ("100-mb-to-stdout", "big_output", {"mb": 100}, 60_000, OK, "{}"),
    ("closes-stdout-and-stderr", "close_stdio", {}, 5000, OK, "'closed': True"),
    ("result-of-50-mb", "big_result", {"mb": 50}, 30_000, "RESULT_TOO_LARGE", "above the cap"),
    ("result-with-a-set", "set_result", {}, 5000, "RESULT_INVALID", "set is not JSON-like"),
    ("result-with-a-datetime", "datetime_result", {}, 5000, "RESULT_INVALID", "datetime is not JSON-like"),
    ("outcome-yes", "outcome_yes", {}, 5000, "RESULT_INVALID", "outcome must be a bool"),
    ("deletes-its-working-directory", "delete_cwd", {}, 5000, OK, "{}"),
    ("fills-its-working-directory", "write_file", {"mb": 50}, 20_000, "LIMIT_EXCEEDED", "file_size limit"),
    ("shared-mmap-beyond-memory", "map_memory", {"mb": 1000, "shared": True}, 20_000, "LIMIT_EXCEEDED",
     "memory limit"),
    ("private-mmap-beyond-memory", "map_memory", {"mb": 1000, "shared": False}, 20_000, "LIMIT_EXCEEDED",
     "memory limit"),
    ("ignores-sigxcpu-into-the-hard-cpu-limit", "cpu_hard_1s", {}, 20_000, "LIMIT_EXCEEDED", "cpu_time limit"),
    ("forges-a-timeout-answer", "forge_answer", {"kind": 2}, 5000, "RESULT_INVALID",
     "claimed the error kind TIMEOUT, which only the runner gives"),
    ("forges-an-import-failure", "forge_answer", {"kind": 9}, 5000, "RESULT_INVALID",
     "claimed the error kind IMPORT_FAILED"),
    ("forges-an-unspecified-kind", "forge_answer", {"kind": 0}, 5000, "RESULT_INVALID",
     "claimed the error kind KIND_UNSPECIFIED"),
    ("reads-the-daemons-secrets", "find_secrets", {"secrets": [{
        "name": "secret", "prefix": "matrix", "length": 17, "path": "",
        "sha256": hashlib.sha256(b"matrix-secret-123").hexdigest()}]}, 30_000, OK, "'found': []"),
]


@pytest.fixture(scope="module")
def matrix_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("matrix"),
        "[limits]\nmemory_mb = 400\nfile_size_mb = 10\nopen_files = 256\n"
        '[tasks.spin_1s]\ntarget = "tests.tasks.faults:spin"\n[tasks.spin_1s.limits]\ncpu_s = 1\n'
        '[tasks.cpu_hard_1s]\ntarget = "tests.tasks.faults:spin_ignoring_sigxcpu"\n'
        '[tasks.cpu_hard_1s.limits]\ncpu_s = 1\n',
        env={"MATRIX_SECRET": "matrix-secret-123"},
    )
    with d.client() as client:
        client.call("echo", 5000)  # the first task starts the threads that stay
    assert wait_for_spares(d)
    process = psutil.Process(d.process.pid)
    d.baseline = (process.memory_info().rss, process.num_threads(), process.num_fds())  # type: ignore[attr-defined]
    d.cases_run = 0  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize(("task", "options", "timeout_ms", "kind", "fragment"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_fault(matrix_daemon: Daemon, tmp_path: Path, task: str, options: dict[str, Any], timeout_ms: int,
               kind: str, fragment: str) -> None:
    options = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in options.items()}
    matrix_daemon.cases_run += 1  # type: ignore[attr-defined]
    with matrix_daemon.client() as client:
        if kind == OK:
            assert fragment in str(client.call(task, timeout_ms, options).result)
        else:
            with pytest.raises(TaskFailed) as caught:
                client.call(task, timeout_ms, options)
            assert caught.value.kind == kind, caught.value
            assert fragment in caught.value.message, caught.value.message
        if "pidfile" in options:  # the processes it recorded are all gone, and there were some
            pids = read_pids(Path(options["pidfile"]))
            assert len(pids) >= 3 and wait_gone(pids) == [], pids
        assert wait_until(lambda: leftovers(matrix_daemon) == [], 5), leftovers(matrix_daemon)
        assert client.call("echo", 5000, {"after": task}).result == {"options": {"after": task}}


def test_daemon_steady_after_the_matrix(matrix_daemon: Daemon) -> None:
    assert matrix_daemon.cases_run == len(CASES)  # type: ignore[attr-defined]  # it ran after all of them
    rss, threads, fds = matrix_daemon.baseline  # type: ignore[attr-defined]
    assert wait_for_spares(matrix_daemon)
    process = psutil.Process(matrix_daemon.process.pid)
    now = (process.memory_info().rss, process.num_threads(), process.num_fds())
    message = f"before (rss, threads, fds) = {(rss, threads, fds)}, after = {now}"
    # Bounded, not growing: the one thread that removes directories tasks left files in, and a
    # helper thread or two gRPC's core starts under load.
    assert now[1] <= threads + 3, message
    assert now[2] <= fds + 4, message
    assert now[0] - rss < 40 << 20, message  # 100 MB of output and a 50 MB result passed through

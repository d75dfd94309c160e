"""The original library's test cases, each over real gRPC against a real daemon."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from task_runner.client import (
    Client,
    TaskCrashed,
    TaskException,
    TaskImportFailed,
    TaskResultInvalid,
    TaskResultTooLarge,
    TaskTimeout,
)
from tests.conftest import REPO, Daemon, read_pids, task_processes, wait_gone, wait_until

FAULTS_FILE = REPO / "tests" / "tasks" / "faults.py"


def line_of(path: Path, marker: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def test_success_round_trips_options(client: Client) -> None:
    options = {"a": 1, "b": [1, 2.5, "x", None, True], "c": {"d": {}}, "big": 2**53}
    answer = client.call("echo", 5000, options)
    assert answer.outcome is True
    assert answer.result == {"options": options}
    assert isinstance(answer.result["options"]["a"], int)
    assert answer.request_id
    assert answer.usage.exit_code == 0 and answer.usage.signal == 0
    assert answer.usage.max_rss_kib > 0


def test_outcome_false_is_an_answer_not_an_error(client: Client) -> None:
    answer = client.call("reject", 5000)
    assert answer.outcome is False
    assert answer.result == {"why": "deterministic"}


def test_bare_bool_return(client: Client) -> None:
    answer = client.call("bare_true", 5000)
    assert answer.outcome is True and answer.result == {}


def test_error_at_import_names_file_and_line_and_is_not_worth_retrying(client: Client) -> None:
    with pytest.raises(TaskImportFailed) as caught:
        client.call("broken_import", 5000)
    error = caught.value
    assert error.type == "ImportError" and not error.retryable
    assert "fails at import" in error.message and "reload" in error.message
    assert error.answer is not None and error.answer.usage.wall_ms == 0  # no process was started for it
    broken = REPO / "tests" / "tasks" / "broken_import.py"
    assert f'File "{broken}", line {line_of(broken, "raise ImportError")}' in error.traceback
    assert "child.py" not in error.traceback  # the runner's own frames are left out


def test_error_while_running_names_file_and_line(client: Client) -> None:
    with pytest.raises(TaskException) as caught:
        client.call("raise_now", 5000)
    error = caught.value
    assert error.type == "ValueError" and error.message == "raised while running"
    assert f'File "{FAULTS_FILE}", line {line_of(FAULTS_FILE, "raised while running")}' in error.traceback
    assert error.retryable


def test_error_passed_to_callback_later(client: Client) -> None:
    with pytest.raises(TaskException, match="passed to the callback") as caught:
        client.call("callback_error_later", 5000)
    assert caught.value.type == "RuntimeError"


def test_callback_called_later_from_a_thread(client: Client) -> None:
    answer = client.call("callback_later", 5000)
    assert answer.outcome is True and answer.result == {"late": True}


def test_uncaught_error_in_a_thread(client: Client) -> None:
    with pytest.raises(TaskException) as caught:
        client.call("thread_error", 5000)
    assert caught.value.type == "KeyError"
    assert "raised in a thread" in caught.value.message
    assert "faults.py" in caught.value.traceback


def test_uncaught_error_in_an_asyncio_callback(client: Client) -> None:
    with pytest.raises(TaskException) as caught:
        client.call("asyncio_callback_error", 5000)
    assert caught.value.type == "LookupError"
    assert "asyncio callback" in caught.value.message


def test_async_task(client: Client) -> None:
    answer = client.call("async_echo", 5000, {"x": "y"})
    assert answer.result == {"options": {"x": "y"}, "async": True}


def test_short_timeout_against_a_longer_task(client: Client) -> None:
    with pytest.raises(TaskTimeout) as caught:
        client.call("sleep", 10, {"ms": 100})
    assert "10 ms" in caught.value.message
    assert caught.value.signal == 9
    answer = caught.value.answer
    assert answer is not None and answer.usage.wall_ms < 1000  # a generous bound: honoured well within 1 s


def test_timeout_kills_a_stubborn_tree(tree_daemon: Daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with tree_daemon.client() as client, pytest.raises(TaskTimeout):
        client.call("stubborn_tree", 3000, {"pidfile": str(pidfile)})
    pids = read_pids(pidfile)
    assert len(pids) == 4, pids  # the task, two grandchildren, one orphaned great-grandchild
    assert wait_gone(pids) == []


def test_each_task_has_its_own_cgroup_when_available(tree_daemon: Daemon) -> None:
    with tree_daemon.client() as client:
        own = client.call("my_cgroup", 5000).result["cgroup"]
    if tree_daemon.cgroup_mode == "auto":  # type: ignore[attr-defined]
        assert re.search(r"/task-runner-\d+/g\d+/s\d+$", own)  # a cgroup per task, in its fork server's
    else:
        assert "task-runner" not in own


@pytest.mark.parametrize(("task", "exit_code", "signal", "text"), [
    ("exit_hard", 1, 0, "exited with code 1"),
    ("sys_exit", 3, 0, "exited with code 3"),
    ("segfault", 0, 11, "SIGSEGV (signal 11)"),
    ("kill_self", 0, 9, "SIGKILL (signal 9)"),
])
def test_unexpected_exits(client: Client, task: str, exit_code: int, signal: int, text: str) -> None:
    with pytest.raises(TaskCrashed) as caught:
        client.call(task, 5000)
    error = caught.value
    assert (error.exit_code, error.signal) == (exit_code, signal)
    assert text in error.message and "without answering" in error.message


def test_callback_called_twice_first_wins(client: Client) -> None:
    answer = client.call("callback_twice", 5000)
    assert answer.outcome is True and answer.result == {"call": 1}


def test_callback_then_hang_answers_and_ends(client: Client) -> None:
    answer = client.call("callback_then_hang", 5000)
    assert answer.result == {"answered": True}
    assert answer.usage.wall_ms < 1000


def test_callback_never_called(client: Client) -> None:
    with pytest.raises(TaskCrashed, match="without calling its callback"):
        client.call("callback_never", 5000)


def test_100_mb_of_output(client: Client) -> None:
    answer = client.call("big_output", 60_000, {"mb": 100})
    assert answer.stdout.endswith(b"THE END\n")
    assert len(answer.stdout) == 16 << 10
    assert answer.stdout_dropped + len(answer.stdout) == (100 << 20) + len(b"THE END\n")
    assert answer.stderr == b"to stderr\n"


def test_oversized_result(client: Client) -> None:
    with pytest.raises(TaskResultTooLarge, match="above the cap"):
        client.call("big_result", 10_000, {"mb": 2})


@pytest.mark.parametrize(("task", "text"), [
    ("set_result", "['a']: set is not JSON-like"),
    ("datetime_result", "['when']: datetime is not JSON-like"),
    ("huge_int_result", "beyond 2^53"),
    ("outcome_yes", "outcome must be a bool, got 'yes'"),
])
def test_results_outside_the_contract(client: Client, task: str, text: str) -> None:
    with pytest.raises(TaskResultInvalid) as caught:
        client.call(task, 5000)
    assert text in caught.value.message


def test_output_tails_are_returned(client: Client) -> None:
    answer = client.call("print_then_answer", 5000)
    assert answer.stdout == b"hello from the task\n"
    assert answer.stderr == b"and from stderr\n"


def test_closing_stdio_still_answers(client: Client) -> None:
    assert client.call("close_stdio", 5000).result == {"closed": True}


def test_nothing_leaks_from_one_task_to_the_next(client: Client) -> None:
    assert client.call("touch_state", 5000).result == {"before": False}
    assert client.call("touch_state", 5000).result == {"before": False}


def test_task_sees_no_daemon_secrets_and_no_extra_fds(client: Client) -> None:
    env = client.call("environment", 5000).result["env"]
    assert "TASK_RUNNER_TEST_SECRET" not in env
    assert "NOTIFY_SOCKET" not in env
    assert "PATH" in env
    fds = client.call("open_fds", 5000).result["fds"]
    # stdin, stdout, stderr, the answer channel, and the descriptor listdir itself opened.
    assert len(fds) <= 5 and fds[:4] == [0, 1, 2, 3], fds


def test_fork_bomb_is_cleaned_up(tree_daemon: Daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with tree_daemon.client() as client, pytest.raises(TaskTimeout):
        client.call("fork_bomb", 2000, {"width": 4, "depth": 3, "pidfile": str(pidfile)})
    pids = read_pids(pidfile)
    assert len(pids) == 1 + 4 * 4, pids  # the task, then 4 chains of 4
    assert wait_gone(pids) == []
    assert wait_until(lambda: leftovers(tree_daemon) == [], 5), leftovers(tree_daemon)


def leftovers(daemon, spares: int = 4) -> list[int]:  # type: ignore[no-untyped-def]
    """Processes under the fork server beyond its idle spares: its children's children, or more
    children than spares (a task process or an adopted orphan still alive)."""
    import psutil

    try:
        zygote = next(p for p in psutil.Process(daemon.process.pid).children() if "forkserver" in " ".join(p.cmdline()))
        direct = task_processes(zygote)
        deeper = [p.pid for task in direct for p in task.children(recursive=True)]
        return deeper + ([p.pid for p in direct] if len(direct) > spares else [])
    except psutil.Error:
        return [-1]  # something changed while we looked: look again


def test_request_id_round_trips(client: Client) -> None:
    answer = client.call("echo", 5000, request_id="my-id-1")
    assert answer.request_id == "my-id-1"


def test_the_daemon_logs_each_finished_task(client: Client, daemon) -> None:  # type: ignore[no-untyped-def]
    client.call("echo", 5000, request_id="log-line-check")
    assert wait_until(lambda: "log-line-check" in daemon.log_text(), 5)
    line = next(line for line in daemon.log_text().splitlines() if "log-line-check" in line)
    assert re.search(r"task echo finished: outcome=true in [\d.]+ ms", line), line

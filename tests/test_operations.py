"""An operator's daemon: failures readable in the log, an access log, reloads that say what they could not
apply, a config check that tells what serve would do, and a CLI that scripts well (issue "An operator's
daemon")."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from task_runner.client import Client, TaskException, TaskNotFound
from task_runner.client.follow import times
from task_runner.client.retry import NO_RETRY
from task_runner.server import logs
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformRequest
from task_runner.values import to_struct
from tests.conftest import FAULTS, REPO, Daemon, read_pids, start_daemon, wait_until, write_config
from tests.inprocess import InProcessDaemon, with_harness_writable

PERFORM = "/task_runner.v1.TaskRunner/Perform"
PERFORM_STREAM = "/task_runner.v1.TaskRunner/PerformStream"


@pytest.fixture(scope="module")
def json_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon logging JSON lines, with a task whose output is logged when it succeeds."""
    daemon = start_daemon(tmp_path_factory.mktemp("ops"), (
        'cgroup = "off"\nlog_format = "json"\n'
        f'[tasks.noisy]\ntarget = "{FAULTS}:print_then_answer"\nlog_output = true\n'
    ))
    yield daemon
    assert daemon.stop() == 0


def log_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's log so far, parsed (every line of it is JSON)."""
    return [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]


def records(daemon: Daemon, request_id: str, logger: str | None = None) -> list[dict[str, Any]]:
    return [line for line in log_lines(daemon)
            if line.get("request_id") == request_id and (logger is None or line["logger"] == logger)]


def test_a_failed_task_leaves_one_warning_with_its_traceback_and_stderr(json_daemon: Daemon) -> None:
    with json_daemon.client() as client, pytest.raises(TaskException) as caught:
        client.call("complain_then_raise", 5000, {"lines": 3}, request_id="fail-1")
    failures = [r for r in records(json_daemon, "fail-1") if r["level"] == "WARNING"]
    assert len(failures) == 1, failures
    failure = failures[0]
    assert failure["logger"] == "task_runner.server" and failure["caller"] == "default"
    assert (failure["task"], failure["kind"], failure["error_type"]) == ("complain_then_raise", "EXCEPTION",
                                                                        "RuntimeError")
    assert failure["error_message"] == caught.value.message
    assert failure["traceback"] == caught.value.traceback and "faults.py" in failure["traceback"]
    assert failure["stderr"].splitlines() == [f"complaint {i:05d} " + "x" * 40 for i in range(3)]
    assert "exit_code" not in failure or failure["exit_code"] is None


def test_a_failures_record_is_bounded_and_cut_between_lines(json_daemon: Daemon) -> None:
    with json_daemon.client() as client, pytest.raises(TaskException) as caught:
        client.call("complain_then_raise", 5000, {"lines": 1000, "message_lines": 2000}, request_id="fail-2")
    (failure,) = [r for r in records(json_daemon, "fail-2") if r["level"] == "WARNING"]
    full_traceback, full_stderr = caught.value.traceback, "".join(
        f"complaint {i:05d} " + "x" * 40 + "\n" for i in range(1000))
    assert len(full_traceback) > logs.TRACEBACK_MAX  # else the bound is not tried
    for logged, full, bound in ((failure["traceback"], full_traceback, logs.TRACEBACK_MAX),
                                (failure["stderr"], full_stderr[-logs.STDERR_MAX * 2:], logs.STDERR_MAX)):
        lines = logged.splitlines()
        marker = next(i for i, line in enumerate(lines) if "characters left out" in line)
        assert len(logged) <= bound + 64
        whole = set(full.splitlines())
        assert all(line in whole for j, line in enumerate(lines) if j != marker), "a line was cut"
        assert lines[-1] == full.splitlines()[-1]  # the end is kept: the innermost frame, the last output
    assert failure["traceback"].startswith("Traceback (most recent call last):\n")


def test_every_call_writes_one_access_line(json_daemon: Daemon) -> None:
    with Client(json_daemon.unix, retry=NO_RETRY) as client:
        assert client.call("echo", 5000, {"a": 1}, request_id="acc-ok").outcome
        assert not client.call("reject", 5000, request_id="acc-false").outcome
        with pytest.raises(TaskException):
            client.call("raise_now", 5000, request_id="acc-error")
        with pytest.raises(TaskNotFound):
            client.call("no_such_task", 5000, request_id="acc-unknown")
        assert client.call("echo", 5000, {"a": 1}, request_id="acc-ok").outcome  # a repeat: the kept answer
        assert list(client.watch("acc-false"))
    expected = {  # request id: (method, status, outcome, error, shared) of each of its calls
        "acc-ok": [("Perform", "OK", "true", "", False), ("Perform", "OK", "true", "", True)],
        "acc-false": [("Perform", "OK", "false", "", False), ("Watch", "OK", "", "", True)],
        "acc-error": [("Perform", "OK", "", "EXCEPTION", False)],
        "acc-unknown": [("Perform", "NOT_FOUND", "", "", False)],
    }
    for request_id, calls in expected.items():
        lines = records(json_daemon, request_id, logs.ACCESS)
        assert [(x["method"], x["status"], x["outcome"], x["error"], x["shared"]) for x in lines] == calls, lines
        for line in lines:
            assert set(logs.ACCESS_FIELDS) <= set(line), line
            assert line["caller"] == "default" and line["peer"].startswith("unix:")
            assert line["queue_ms"] >= 0 and line["run_ms"] >= 0 and line["total_ms"] > 0
            assert line["bytes_in"] > 0 or line["method"] == "Watch"
            if line["status"] == "OK":
                assert line["bytes_out"] > 0
            if not line["shared"]:
                assert line["queue_ms"] + line["run_ms"] <= line["total_ms"], line
    ran = records(json_daemon, "acc-error", logs.ACCESS)[0]
    assert ran["task"] == "raise_now" and ran["run_ms"] > 0


def test_a_caller_who_leaves_is_logged_with_the_execution_it_opened_or_joined(json_daemon: Daemon,
                                                                             tmp_path: Path) -> None:
    """Its access line names the execution (the daemon's id for a call without one) and whether it was another
    call's, though the executor never told it what the call came to."""
    pidfile = tmp_path / "pids"
    options = to_struct({"pidfile": str(pidfile), "s": 30})
    own = PerformRequest(task="write_pid_and_sleep", timeout_ms=60_000, options=options)
    first = PerformRequest(task="write_pid_and_sleep", timeout_ms=60_000, options=options, request_id="left-1")

    async def leave() -> None:
        async with grpc.aio.insecure_channel(json_daemon.unix) as channel:
            perform = channel.unary_unary(PERFORM)
            calls = [perform(request.SerializeToString(), timeout=60) for request in (own, first)]
            assert await asyncio.to_thread(wait_until, lambda: len(read_pids(pidfile)) == 2, 20)  # both run
            # A repeat of left-1 as a stream: its first event says it has joined the running execution.
            repeat = channel.unary_stream(PERFORM_STREAM)(first.SerializeToString(), timeout=60)
            assert PerformEvent.FromString(await repeat.read()).HasField("started")
            for call in (*calls, repeat):  # every caller leaves
                call.cancel()
            for call in calls:
                with pytest.raises(asyncio.CancelledError):
                    await call

    asyncio.run(leave())
    assert wait_until(lambda: len(records(json_daemon, "left-1", logs.ACCESS)) == 2, 10)
    left = sorted((line["method"], line["status"], line["shared"])
                  for line in records(json_daemon, "left-1", logs.ACCESS))
    assert left == [("Perform", "CANCELLED", False), ("PerformStream", "CANCELLED", True)], left
    ran = [line for line in log_lines(json_daemon) if line["logger"] == logs.ACCESS
           and line["task"] == "write_pid_and_sleep" and line["request_id"] != "left-1"]
    assert len(ran) == 1 and ran[0]["request_id"] and not ran[0]["shared"], ran  # the daemon's id for it


def test_a_tasks_output_is_logged_when_it_asks_for_it(json_daemon: Daemon) -> None:
    with json_daemon.client() as client:
        assert client.call("noisy", 5000, request_id="noisy-1").outcome
        assert client.call("print_then_answer", 5000, request_id="quiet-1").outcome
    (output,) = [r for r in records(json_daemon, "noisy-1") if "stdout" in r]
    assert output["stdout"] == "hello from the task\n" and output["stderr"] == "and from stderr\n"
    assert not [r for r in records(json_daemon, "quiet-1") if "stdout" in r]


def test_a_reload_says_which_changes_need_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "d"
    text = write_config(tmp_path / "tasks.toml", 'cgroup = "off"\nmax_running = 4\n').read_text()
    with InProcessDaemon(directory, text) as d, caplog.at_level(logging.WARNING):
        changed = text.replace("max_running = 4", "max_running = 8\ndefault_timeout_ms = 7000")
        (directory / "config.toml").write_text(with_harness_writable(changed, directory))
        after = len(d.notifier.states)
        d.request_reload()
        assert d.notifier.wait_for("STATUS=reloaded", 20, after), d.notifier.states
        assert d.daemon.config.max_running == 4  # kept
        assert d.daemon.config.default_timeout_ms == 7000  # applied
    said = [r.getMessage() for r in caplog.records if "needs a restart" in r.getMessage()]
    assert said == ["reload: max_running: 4 → 8 needs a restart; kept 4"], said


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "task_runner.server.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_check_config_refuses_what_serve_refuses_and_lists_every_problem(tmp_path: Path) -> None:
    exposed = tmp_path / "exposed.toml"
    exposed.write_text('listen = ["0.0.0.0:50051"]\n')
    refused = check_config(exposed)
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0:50051 without TLS or a token" in refused.stderr
    serve = subprocess.run([sys.executable, "-m", "task_runner.server.cli", "serve", "--config", str(exposed)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert serve.returncode != 0 and "refusing to listen" in serve.stderr  # as serve itself does

    several = tmp_path / "several.toml"
    several.write_text(
        'listen = ["0.0.0.0:50051", "unix:/nonexistent/dir/x.sock"]\nrun_as_user = "no-such-user-here"\n'
        '[tasks]\nfine = "tests.tasks.faults:echo"\nbroken = "tests.tasks.broken_import:never"\n'
        'missing = "no_such_module_anywhere:run"\nwrong_name = "tests.tasks.faults:no_such_function"\n'
    )
    refused = check_config(several)
    assert refused.returncode == 2
    for problem in ("refusing to listen on 0.0.0.0:50051", "no such user or group",
                    "cannot listen on unix:/nonexistent/dir/x.sock",
                    "task broken: cannot import tests.tasks.broken_import:never: ImportError: this module fails",
                    "task missing: cannot import no_such_module_anywhere:run: ModuleNotFoundError",
                    "task wrong_name: cannot import tests.tasks.faults:no_such_function: AttributeError",
                    "6 problems: serve would not start"):
        assert problem in refused.stderr, (problem, refused.stderr)
    assert "task fine" not in refused.stderr
    broken_only = tmp_path / "broken.toml"
    broken_only.write_text('[tasks]\nbroken = "tests.tasks.broken_import:never"\n')
    refused = check_config(broken_only)
    assert refused.returncode == 2 and "1 problem: serve would start, and answer their calls IMPORT_FAILED" in \
        refused.stderr, refused.stderr


def cli(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "task_runner.client.cli", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO)


def test_the_cli_exit_codes_and_its_errors(json_daemon: Daemon, tmp_path: Path) -> None:
    target = ("--target", json_daemon.unix)
    assert cli("perform", "echo", *target).returncode == 0
    assert cli("perform", "reject", *target).returncode == 1
    failed = cli("perform", "raise_now", *target)
    assert failed.returncode == 2 and failed.stdout == ""
    summary, traceback = failed.stderr.split("\n", 1)  # the summary line, then the traceback (tests/test_cli.py)
    assert summary == "task-runner: the task failed: EXCEPTION: ValueError: raised while running"
    assert traceback.startswith("Traceback (most recent call last):")
    failed = cli("perform", "raise_now", "--json", *target)
    assert failed.returncode == 2 and json.loads(failed.stdout)["error"]["kind"] == "EXCEPTION"
    unknown = cli("perform", "nope", *target)
    assert unknown.returncode == 66 and unknown.stdout == "" and len(unknown.stderr.splitlines()) == 1
    assert unknown.stderr.startswith("task-runner: NOT_FOUND: unknown task 'nope'")
    unknown = cli("perform", "nope", "--json", *target)
    assert unknown.returncode == 66 and json.loads(unknown.stdout)["error"]["status"] == "NOT_FOUND"
    gone = cli("perform", "echo", "--no-retry", "--target", f"unix:{tmp_path}/nothing.sock")
    assert gone.returncode == 69 and "UNAVAILABLE" in gone.stderr
    assert cli("cancel", "never-made", *target).returncode == 66
    listed = cli("tasks", "--json", *target)
    assert listed.returncode == 0 and "echo" in {t["name"] for t in json.loads(listed.stdout)}
    for usage in (("perform",), ("perform", "echo", "--options", "[1]", *target), ("bogus-command",),
                  ("perform", "echo", "--timeout", "soon")):
        wrong = cli(*usage)
        assert wrong.returncode == 64, (usage, wrong.returncode, wrong.stderr)


def test_a_closed_stdout_ends_the_cli_quietly(json_daemon: Daemon) -> None:
    for args in (("tasks",), ("perform", "echo"), ("watch", "acc-ok-closed")):
        if args[0] == "watch":
            with json_daemon.client() as client:
                assert client.call("print_then_answer", 5000, request_id="acc-ok-closed").outcome
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first byte: `| head -0`
        try:
            done = cli(*args, "--target", json_daemon.unix, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == 141, (args, done.stderr)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_follow_says_the_time_to_the_deadline_and_estimates_the_rest() -> None:
    assert times(10.0, 60.0, None) == "50 s to the deadline"
    assert times(10.0, 60.0, 0.25) == "50 s to the deadline, about 30 s to go"
    assert times(10.0, None, 0.5) == "about 10 s to go"
    assert times(70.0, 60.0, 1.0) == "0 s to the deadline"

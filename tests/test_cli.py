"""The `task-runner` command as a user meets it, run as installed against a real daemon (issue "Keep every
promise, third round"): watch's times, a failure's traceback, distinct exit codes, options before the
command, --version, and $TRACEPARENT passed on."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from task_runner.client import Client, Security
from task_runner.client.retry import NO_RETRY
from tests.conftest import REPO, Daemon, start_daemon, wait_until
from tests.test_admission import Gate

TASK_RUNNER = str(Path(sys.executable).parent / "task-runner")  # the installed script, as a user runs it
TOKENS = {"me": "me-token-0123456789abcdef", "limited": "limited-token-0123456789abcdef"}
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with two named callers: `me` may run every task, `limited` only a few, one at a time and
    none waiting."""
    directory = tmp_path_factory.mktemp("cli")
    tables = []
    for name, lines in {"me": 'tasks = ["*"]\n',
                        "limited": 'tasks = ["echo", "log_start"]\nmax_running = 1\nmax_queued = 0\n'}.items():
        (directory / f"{name}.token").write_text(TOKENS[name] + "\n")
        tables.append(f'[callers.{name}]\ntoken_file = "{directory / name}.token"\n{lines}')
    daemon = start_daemon(directory, 'cgroup = "off"\n' + "\n".join(tables),
                          args=("--task", "paced=tests.tasks.paced:paced"))
    yield daemon
    assert daemon.stop() == 0, daemon.log_text()


def cli(*args: str, caller: str | None = "me", **env: str) -> subprocess.CompletedProcess[str]:
    """`task-runner ARGS` as `caller` (None: with no token), with `env` added to the environment."""
    full = {k: v for k, v in os.environ.items() if k not in ("TRACEPARENT", "TRACESTATE", "TASK_RUNNER_TOKEN")}
    full |= ({"TASK_RUNNER_TOKEN": TOKENS[caller]} if caller else {}) | env
    return subprocess.run([TASK_RUNNER, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


def as_(d: Daemon, name: str) -> Client:
    return Client(d.unix, Security(token=TOKENS[name]), retry=NO_RETRY)


def progress_times(stderr: str) -> tuple[int, int]:
    """The (to the deadline, to go) seconds of the line of the `paced` task's progress."""
    line = next((line for line in stderr.splitlines() if "progress 10% working" in line), stderr)
    found = re.search(r"progress 10% working \((\d+) s to the deadline, about (\d+) s to go\)$", line)
    assert found, line
    return int(found[1]), int(found[2])


def test_watch_shows_the_time_to_the_deadline_and_an_estimate_as_perform_follow_does(d: Daemon) -> None:
    """10% done after 0.3 s of a 30 s timeout: 29.7 s to the deadline and about 2.7 s to go, on the daemon's
    clock; a watch that replays the events at once says the same (it said "about 0 s to go", no deadline)."""
    options = json.dumps({"ms": 300, "fraction": 0.1})
    followed = cli("perform", "paced", "--timeout", "30000", "--options", options, "--follow",
                   "--request-id", "eta-1", "--target", d.unix)
    assert followed.returncode == 0, followed.stderr
    deadline, to_go = progress_times(followed.stderr)
    assert 28 <= deadline <= 30 and 2 <= to_go <= 5, followed.stderr
    watched = cli("watch", "eta-1", "--target", d.unix)  # finished: replayed, in a moment
    assert watched.returncode == 0, watched.stderr
    assert progress_times(watched.stderr) == (deadline, to_go), watched.stderr
    with as_(d, "me") as client:  # the task's default timeout: the daemon says its deadline all the same
        assert client.call("paced", None, {"ms": 300, "fraction": 0.1}, request_id="eta-2").outcome
        default_s = next(t.default_timeout_ms for t in client.tasks() if t.name == "paced") / 1e3
    deadline, to_go = progress_times(cli("watch", "eta-2", "--target", d.unix).stderr)
    assert default_s - 2 <= deadline <= default_s and 2 <= to_go <= 5


def test_a_failure_in_text_mode_shows_its_traceback_and_stderr_tail_on_stderr(d: Daemon) -> None:
    failed = cli("perform", "complain_then_raise", "--options", '{"lines": 50, "message_lines": 3}',
                 "--target", d.unix)
    assert failed.returncode == 2 and failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert lines[0] == "task-runner: the task failed: EXCEPTION: RuntimeError: message line 00000"  # as before
    traceback = failed.stderr.index("Traceback (most recent call last):")
    assert 'in complain_then_raise\n    raise RuntimeError(message)' in failed.stderr[traceback:]
    tail = failed.stderr.index("the task's stderr")
    assert traceback < tail and "complaint 00049" in failed.stderr[tail:]
    assert "complaint 00000" not in failed.stderr  # bounded: the last lines of its stderr
    assert len(lines) < 80, failed.stderr

    flood = cli("perform", "complain_then_raise", "--options", '{"lines": 5000, "message_lines": 5000}',
                "--target", d.unix)
    assert flood.returncode == 2 and len(flood.stderr.splitlines()) < 100 and len(flood.stderr) < 20_000
    assert "lines of the traceback not shown" in flood.stderr and "lines of its stderr not shown" in flood.stderr
    assert "complaint 04999" in flood.stderr
    assert "message line 04999" in flood.stderr  # a traceback keeps its end: the exception and its message


def test_the_json_of_a_failed_task_has_no_false_outcome(d: Daemon) -> None:
    failed = cli("perform", "raise_now", "--json", "--target", d.unix)
    assert failed.returncode == 2
    answer = json.loads(failed.stdout)
    assert answer["error"]["kind"] == "EXCEPTION" and "outcome" in answer and answer["outcome"] is None
    assert "raised while running" in answer["error"]["traceback"]
    rejected = cli("perform", "reject", "--json", "--target", d.unix)  # a deterministic failure keeps its false
    assert rejected.returncode == 1 and json.loads(rejected.stdout)["outcome"] is False


def test_each_kind_of_failed_call_has_its_own_exit_code(d: Daemon, tmp_path: Path) -> None:
    target = ("--target", d.unix)
    unknown = cli("perform", "nope", *target)
    assert unknown.returncode == 66 and unknown.stderr.startswith("task-runner: NOT_FOUND: unknown task 'nope'")
    assert cli("watch", "never-made", *target).returncode == 66
    assert cli("cancel", "never-made", "--json", *target).returncode == 66
    too_long = cli("perform", "echo", "--timeout", "4000000000", "--json", *target)
    assert too_long.returncode == 65 and json.loads(too_long.stdout)["error"]["status"] == "INVALID_ARGUMENT"
    denied = cli("perform", "whoami", "--json", *target, caller="limited")
    assert denied.returncode == 77 and json.loads(denied.stdout)["error"]["reason"] == "TASK_NOT_PERMITTED"
    anonymous = cli("perform", "echo", *target, caller=None)
    assert anonymous.returncode == 77 and "UNAUTHENTICATED" in anonymous.stderr
    gone = cli("perform", "echo", "--no-retry", "--target", f"unix:{tmp_path}/nothing.sock")
    assert gone.returncode == 69 and "UNAVAILABLE" in gone.stderr

    gate = Gate(tmp_path / "log", tmp_path / "gate")
    with as_(d, "limited") as client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.call, "log_start", 30_000, gate.options("block", wait=True))
        try:  # its one slot is taken and none may wait: refused for now
            assert wait_until(lambda: "block" in gate.started(), 20)
            full = cli("perform", "echo", "--no-retry", "--json", *target, caller="limited")
            assert full.returncode == 69 and json.loads(full.stdout)["error"]["reason"] == "QUEUE_FULL", full.stdout
        finally:
            gate.open()
        assert blocker.result(timeout=30).outcome


def test_the_exit_codes_are_in_the_help() -> None:
    from task_runner.client.cli import EXIT_CODES

    shown = cli("--help")
    assert shown.returncode == 0
    for code, meaning in EXIT_CODES.items():
        assert re.search(rf"^ *{code} +{re.escape(meaning)}", shown.stdout, re.MULTILINE), (code, shown.stdout)


def test_the_client_options_go_before_the_command_or_after_it(d: Daemon) -> None:
    for args in (("--target", d.unix, "--json", "tasks"), ("tasks", "--target", d.unix, "--json"),
                 ("--json", "tasks", "--target", d.unix), ("--target", "unix:/nowhere.sock", "tasks", "--json",
                                                           "--target", d.unix)):
        listed = cli(*args)
        assert listed.returncode == 0 and "echo" in {t["name"] for t in json.loads(listed.stdout)}, (args, listed)
    performed = cli("--target", d.unix, "--no-retry", "perform", "echo", "--options", '{"a": 1}')
    assert performed.returncode == 0 and json.loads(performed.stdout)["result"] == {"options": {"a": 1}}
    alone = subprocess.run([sys.executable, "-m", "task_runner.client.cli", "--target", d.unix, "tasks"], cwd=REPO,
                           env={**os.environ, "TASK_RUNNER_TOKEN": TOKENS["me"]}, capture_output=True, text=True,
                           timeout=60)  # the client's commands alone take them too
    assert alone.returncode == 0 and "echo" in alone.stdout, alone.stderr


def test_version() -> None:
    shown = cli("--version")
    assert shown.returncode == 0
    assert shown.stdout == f"task-runner {importlib.metadata.version('isolated-task-runner')}\n"


def test_traceparent_from_the_environment_reaches_the_task(d: Daemon) -> None:
    traced = cli("perform", "trace_of", "--target", d.unix, TRACEPARENT=PARENT, TRACESTATE="vendor=opaque")
    assert traced.returncode == 0, traced.stderr
    got = json.loads(traced.stdout)["result"]
    assert got["env"] == PARENT and got["context"] == {"traceparent": PARENT, "tracestate": "vendor=opaque"}
    malformed = cli("perform", "trace_of", "--target", d.unix, TRACEPARENT="garbage", TRACESTATE="vendor=opaque")
    assert malformed.returncode == 0 and json.loads(malformed.stdout)["result"]["context"] == {}
    assert "TRACEPARENT" in malformed.stderr  # said, not silently dropped
    untraced = cli("perform", "trace_of", "--target", d.unix)
    assert untraced.returncode == 0 and json.loads(untraced.stdout)["result"]["context"] == {}

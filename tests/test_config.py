"""The configuration and its check: `check-config` says what `serve` would do, every problem of a file in one
run, a `writable` path that could not be written, and the messages a user first meets (issue "Keep every
promise, third round": items 3, 4, 5 and part of 11)."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from task_runner.server.config import ConfigError, load
from tests.conftest import REPO, Daemon
from tests.inprocess import InProcessDaemon

TASK_RUNNER = Path(sys.executable).parent / "task-runner"  # the console script, as a user runs it
ECHO = "task_runner.server.examples:echo"
# The six mistakes of the issue, each in its own key.
SIX_MISTAKES = f"""\
max_runing = 4
default_timeout_ms = "30s"

[sandbox]
network = "offline"

[tasks]
echo = "{ECHO}"
spaced = "not a target"
headless = "mytasks:"

[callers.ops]
token_env = "TASK_RUNNER_TEST_OPS_TOKEN"
tasks = ["echo", "no_such_task"]
"""
SIX_PROBLEMS = (  # in the order load finds them: the file's keys in turn (a table's types with it), then values
    "unknown key 'max_runing'",
    "'default_timeout_ms' must be int, got str '30s'",
    "'tasks.spaced.target': task target 'not a target' is not of the form",
    "'tasks.headless.target': task target 'mytasks:' is not of the form",
    "'sandbox.network' must be \"none\" or \"host\"",
    "'callers.ops.tasks': no task named no_such_task",
)


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_load_raises_one_error_with_every_problem_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "six.toml"
    path.write_text(SIX_MISTAKES)
    with pytest.raises(ConfigError) as raised:
        load(path)
    problems = raised.value.problems
    assert len(problems) == 6, problems
    for problem, expected in zip(problems, SIX_PROBLEMS, strict=True):
        assert problem.startswith(f"{path}: ") and expected in problem, (problem, expected)
    assert str(raised.value).splitlines() == problems


def test_check_config_lists_all_six_mistakes_in_one_run_and_serve_refuses_with_all_of_them(tmp_path: Path) -> None:
    path = tmp_path / "six.toml"
    path.write_text(SIX_MISTAKES)
    checked = run(str(TASK_RUNNER), "check-config", str(path))
    assert checked.returncode == 2, checked.stderr
    lines = checked.stderr.splitlines()
    for expected in SIX_PROBLEMS:
        assert sum(expected in line for line in lines) == 1, (expected, checked.stderr)
    assert lines[-1] == f"task-runner: {path}: 6 problems: serve would not start", checked.stderr
    served = run(str(TASK_RUNNER), "serve", "--config", str(path))
    assert served.returncode == 2
    for expected in SIX_PROBLEMS:
        assert sum(expected in line and line.startswith("task-runner: ") for line in served.stderr.splitlines()) == 1, \
            (expected, served.stderr)


def test_a_toml_syntax_error_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("max_running = \n")
    checked = run(str(TASK_RUNNER), "check-config", str(path))
    assert checked.returncode == 2 and "not valid TOML" in checked.stderr
    assert checked.stderr.splitlines()[-1] == f"task-runner: {path}: 1 problem: serve would not start"


def serve(directory: Path, config: Path, cwd: Path, env: dict[str, str]) -> Daemon:
    """`task-runner serve`, the console script, run from `cwd`; returned once it is ready."""
    notify_path = directory / "notify"
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify_path))
    unix = f"unix:{directory / 'daemon.sock'}"
    log = directory / "daemon.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([str(TASK_RUNNER), "serve", "--config", str(config), "--listen", unix],
                                   cwd=cwd, env={**env, "NOTIFY_SOCKET": str(notify_path)}, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    daemon = Daemon(process, unix, "", log, notify_sock=notify_sock)
    if not daemon.wait_for("READY=1", 30):
        daemon.stop(timeout=5)
        raise RuntimeError(f"the daemon did not start:\n{daemon.log_text()}")
    return daemon


def test_check_config_and_serve_agree_on_the_current_directory(tmp_path: Path) -> None:
    """The README's case: mytasks.py beside you, the console script run there. serve does not import it;
    check-config says so (it used to say OK, its child's `-c` searching the current directory), and why."""
    here = tmp_path / "project"
    here.mkdir()
    (here / "mytasks.py").write_text("def hello(options):\n    return {'hello': 'world'}\n")
    config = here / "my.toml"
    config.write_text('entry_points = false\ncgroup = "off"\n[tasks]\nhello = "mytasks:hello"\n')
    env = without_pythonpath()
    checked = run(str(TASK_RUNNER), "check-config", "my.toml", cwd=here, env=env)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert ("task hello: cannot import mytasks:hello: ModuleNotFoundError: No module named 'mytasks' (mytasks.py is "
            "in the current directory, which serve does not search: set PYTHONPATH=. or install it)") \
        in checked.stderr, checked.stderr
    daemon = serve(tmp_path, config, here, env)
    try:
        with daemon.client() as client:
            (task,) = client.tasks()
            assert "No module named 'mytasks'" in task.import_error  # as check-config said
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    fixed = run(str(TASK_RUNNER), "check-config", "my.toml", cwd=here, env={**env, "PYTHONPATH": "."})
    assert fixed.returncode == 0 and "my.toml: OK (1 tasks" in fixed.stdout, fixed.stdout + fixed.stderr


def test_the_hint_is_given_only_where_the_current_directory_holds_the_module(tmp_path: Path) -> None:
    config = tmp_path / "my.toml"
    config.write_text('entry_points = false\n[tasks]\nhello = "mytasks_nowhere:hello"\n')
    checked = run(str(TASK_RUNNER), "check-config", str(config), cwd=tmp_path, env=without_pythonpath())
    assert checked.returncode == 2 and "No module named 'mytasks_nowhere'" in checked.stderr
    assert "current directory" not in checked.stderr


def test_a_writable_path_in_a_hidden_directory_is_refused_by_check_config_and_serve(tmp_path: Path) -> None:
    """The config's directory is hidden whole from tasks, after the writable paths are mounted: a writable
    path there (or under a `hide`) would be an empty read-only directory to them."""
    etc = tmp_path / "etc"
    (etc / "data").mkdir(parents=True)
    (tmp_path / "cache").mkdir()
    config = etc / "config.toml"
    config.write_text(
        f'entry_points = false\n[sandbox]\nwritable = ["{etc}/data"]\n'
        f'[tasks]\necho = "{ECHO}"\n'
        f'[tasks.own]\ntarget = "{ECHO}"\nsandbox = {{writable = ["{tmp_path}/cache"], hide = ["{tmp_path}/cache"]}}\n'
    )
    expected = (
        f"'sandbox.writable': {etc}/data is under {etc}, which is hidden from tasks (it holds the config file "
        f"{config}: the daemon hides the directory of its config, tokens and TLS key from every task), so they would "
        "find it empty and read-only: move the config file elsewhere, or make another path writable",
        f"'tasks.own.sandbox.writable': {tmp_path}/cache is hidden from tasks ('tasks.own.sandbox.hide' hides it), so "
        "they would find it empty and read-only: take it out of 'tasks.own.sandbox.hide', or make another path "
        "writable",
    )
    checked = run(str(TASK_RUNNER), "check-config", str(config))
    assert checked.returncode == 2
    for problem in expected:
        assert f"task-runner: {config}: {problem}\n" in checked.stderr, (problem, checked.stderr)
    assert checked.stderr.splitlines()[-1] == f"task-runner: {config}: 2 problems: serve would not start"
    served = run(str(TASK_RUNNER), "serve", "--config", str(config))
    assert served.returncode == 2 and all(problem in served.stderr for problem in expected), served.stderr
    # A writable path that holds the hidden directory is writable but for it: that is no problem.
    config.write_text(f'entry_points = false\n[sandbox]\nwritable = ["{tmp_path}"]\n[tasks]\necho = "{ECHO}"\n')
    fine = run(str(TASK_RUNNER), "check-config", str(config))
    assert fine.returncode == 0, fine.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")
def test_list_tasks_and_the_cli_show_the_paths_a_task_may_write_and_cannot_see(tmp_path: Path) -> None:
    shared, secret = tmp_path / "shared", tmp_path / "secret"
    shared.mkdir()
    secret.mkdir()
    (tmp_path / "link").symlink_to(shared)  # shown as the path the task really gets
    text = (f'cgroup = "off"\nentry_points = false\n[sandbox]\nwritable = ["{tmp_path}/link"]\n'
            f'[tasks]\necho = "{ECHO}"\n'
            f'[tasks.open]\ntarget = "{ECHO}"\nsandbox = {{filesystem = "host"}}\n'
            f'[tasks.secretive]\ntarget = "{ECHO}"\nsandbox = {{hide = ["{secret}"]}}\n')
    with InProcessDaemon(tmp_path / "d", text) as d, d.client() as client:
        shown = {task.name: task.sandbox for task in client.tasks()}
        listed = run(sys.executable, "-m", "task_runner.client.cli", "tasks", "--target", d.unix)
    config_dir = os.path.realpath(tmp_path / "d")  # the daemon's config is there
    echo, secretive, opened = shown["echo"], shown["secretive"], shown["open"]
    assert echo is not None and secretive is not None and opened is not None
    assert echo.writable == (os.path.realpath(shared),) and echo.hide == (config_dir,), echo
    assert secretive.writable == echo.writable
    assert secretive.hide == tuple(sorted((config_dir, os.path.realpath(secret)))), secretive
    assert (opened.filesystem, opened.writable, opened.hide) == ("host", (), ())  # the host's: nothing hidden
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert f"writable {os.path.realpath(shared)}, hidden {config_dir}]" in lines["echo"], listed.stdout
    assert "writable" not in lines["open"] and "hidden" not in lines["open"], listed.stdout


def test_an_unset_token_env_is_named(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_RUNNER_TEST_UNSET_")}
    tables = {"[auth]": '[auth]\ntoken_env = "TASK_RUNNER_TEST_UNSET_AUTH"\n',
              "callers.ops": '[callers.ops]\ntoken_env = "TASK_RUNNER_TEST_UNSET_OPS"\ntasks = ["echo"]\n'}
    for what, table in tables.items():
        config = tmp_path / "auth.toml"
        config.write_text(f'{table}[tasks]\necho = "{ECHO}"\n')
        variable = re.findall(r'token_env = "(\w+)"', table)[0]
        checked = run(str(TASK_RUNNER), "check-config", str(config), env=env)
        assert checked.returncode == 2 and (
            f"the token of {what} is missing: its token_env names the environment variable {variable}, which is "
            "not set") in checked.stderr, checked.stderr
    short = run(str(TASK_RUNNER), "check-config", str(config), env={**env, "TASK_RUNNER_TEST_UNSET_OPS": "short"})
    assert "the token of callers.ops (the variable TASK_RUNNER_TEST_UNSET_OPS) is missing or shorter than 16 " \
        "characters" in short.stderr, short.stderr


def busy_port() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_a_port_in_use_is_said_once_in_the_daemons_words(tmp_path: Path) -> None:
    """Not gRPC's raw C-core line (`E1208 ... add_port.cc:83] Failed to add port to server: ...`) first."""
    with busy_port() as held:
        address = f"127.0.0.1:{held.getsockname()[1]}"
        served = run(str(TASK_RUNNER), "serve", "--listen", address, "--task", f"echo={ECHO}")
    assert served.returncode == 1
    assert "add_port" not in served.stderr and not re.search(r"^[EWI]\d{4} ", served.stderr, re.M), served.stderr
    assert served.stderr.splitlines()[-1] == f"task-runner: cannot listen on {address}: Address already in use"


def test_a_json_log_lines_time_has_its_timezone(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.UTC)
    with busy_port() as held:  # (a daemon that starts, logs and stops at once)
        served = run(str(TASK_RUNNER), "serve", "--listen", f"127.0.0.1:{held.getsockname()[1]}", "--task",
                     f"echo={ECHO}", "--log-format", "json")
    lines = [json.loads(line) for line in served.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["message"] == "stopped", served.stderr
    for line in lines:
        moment = datetime.datetime.fromisoformat(line["time"])
        assert moment.tzinfo is not None and moment.utcoffset() == datetime.timedelta(0), line
        assert before - datetime.timedelta(seconds=1) <= moment <= datetime.datetime.now(datetime.UTC), line



def test_check_config_names_every_token_it_cannot_read(tmp_path: Path) -> None:
    """Two callers' token files and the metrics token missing: one run says all three, as serve would fail on each."""
    config = tmp_path / "tokens.toml"
    config.write_text(f'metrics_listen = "127.0.0.1:0"\nmetrics_token_file = "{tmp_path}/no-metrics-token"\n'
                      f'[callers.ops]\ntoken_file = "{tmp_path}/no-ops-token"\ntasks = ["echo"]\n'
                      f'[callers.ci]\ntoken_file = "{tmp_path}/no-ci-token"\ntasks = ["echo"]\n'
                      f'[tasks]\necho = "{ECHO}"\n')
    checked = run(str(TASK_RUNNER), "check-config", str(config))
    assert checked.returncode == 2, checked.stderr
    for what, name in (("callers.ops", "no-ops-token"), ("callers.ci", "no-ci-token"),
                       ("metrics_token_file", "no-metrics-token")):
        assert f"cannot read the token file {tmp_path}/{name} of {what}" in checked.stderr, checked.stderr
    assert checked.stderr.splitlines()[-1].endswith("3 problems: serve would not start"), checked.stderr

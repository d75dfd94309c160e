"""Start, notify, drain on SIGTERM, force on a second one, die with the daemon; and the config's checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from task_runner.client import NO_RETRY, Client, TaskCancelled, Unavailable
from task_runner.server.config import ConfigError, load
from tests.conftest import REPO, read_pids, start_daemon, wait_gone, wait_until


def test_notify_protocol_ready_then_stopping(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        assert "READY=1" in daemon.notifications
        assert any(n.startswith("STATUS=listening on unix:") for n in daemon.notifications)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(30) == 0
        assert "STOPPING=1" in daemon.read_notifications(timeout=1) + daemon.notifications
    finally:
        daemon.stop()


def test_sigterm_drains_running_tasks_and_refuses_new_ones(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "drain_grace_s = 20")
    pidfile = tmp_path / "pids"
    with daemon.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "write_pid_and_sleep", 30_000, {"pidfile": str(pidfile), "s": 5})
        assert wait_until(lambda: read_pids(pidfile), 10)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_for("STOPPING=1", 10), daemon.log_text()
        with Client(daemon.unix, retry=NO_RETRY) as once, pytest.raises(Unavailable, match="shutting down"):
            once.call("echo", 5000)
        assert running.result(timeout=30).outcome is True  # it was allowed to finish
    assert daemon.process.wait(30) == 0
    daemon.stop()


def test_second_sigterm_cancels_running_tasks(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "drain_grace_s = 60")
    pidfile = tmp_path / "pids"
    with daemon.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60})
        assert wait_until(lambda: read_pids(pidfile), 10)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_for("STOPPING=1", 10), daemon.log_text()
        daemon.process.send_signal(signal.SIGTERM)
        with pytest.raises(TaskCancelled):
            running.result(timeout=30)
    assert daemon.process.wait(30) == 0
    assert wait_gone(read_pids(pidfile)) == []
    daemon.stop()


def test_sigkilled_daemon_takes_its_tasks_with_it(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d")
    pidfile = tmp_path / "pids"
    with daemon.client() as client, ThreadPoolExecutor(1) as pool:
        pool.submit(client.call, "stubborn_tree", 60_000, {"pidfile": str(pidfile)})
        assert wait_until(lambda: len(read_pids(pidfile)) == 4, 10)
        daemon.process.kill()
        assert wait_gone(read_pids(pidfile), timeout=10) == []
    daemon.stop()


def test_unknown_config_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("max_runing = 4\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'max_runing'"):
        load(config)
    config.write_text("max_running = 'four'\n")
    with pytest.raises(ConfigError, match=r"'max_running' must be int, got str 'four'"):
        load(config)
    config.write_text("[tasks.x]\ntarget = 'not a target'\n")
    with pytest.raises(ConfigError, match=r"'tasks\.x\.target'"):
        load(config)
    config.write_text("[tasks.x]\ntarget = 'm:f'\ntimeout = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\.x\.timeout'"):
        load(config)


def test_config_values_and_cli_overrides(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(
        'listen = ["unix:/tmp/x.sock"]\nmax_running = 3\ndrain_grace_s = 5\n'
        '[tasks]\nquick = "tests.tasks.faults:echo"\n'
        '[tasks.slow]\ntarget = "tests.tasks.faults:sleep"\ndefault_timeout_ms = 100\nmax_timeout_ms = 200\n'
    )
    loaded = load(config, max_running=7, listen=None)
    assert loaded.max_running == 7 and loaded.listen == ("unix:/tmp/x.sock",) and loaded.drain_grace_s == 5.0
    assert loaded.timeouts_ms(loaded.tasks["slow"]) == (100, 200)
    assert loaded.timeouts_ms(loaded.tasks["quick"]) == (30_000, 3_600_000)


def test_check_config_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("max_running = 2\n")
    bad.write_text("bogus = 1\n")
    cmd = [sys.executable, "-m", "task_runner.server.cli", "check-config"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert ok.returncode == 0 and "OK" in ok.stdout
    refused = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode == 2 and "unknown key 'bogus'" in refused.stderr


def test_listen_failure_is_reported(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "task_runner.server", "--listen", "unix:/nonexistent/dir/x.sock"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1 and "cannot listen on unix:/nonexistent/dir/x.sock" in done.stderr


def test_a_dead_fork_server_is_replaced(tmp_path: Path) -> None:
    import psutil

    daemon = start_daemon(tmp_path / "d")
    try:
        with daemon.client() as client:
            assert client.call("echo", 5000).outcome
            zygote = next(p for p in psutil.Process(daemon.process.pid).children()
                          if "forkserver" in " ".join(p.cmdline()))
            zygote.kill()
            assert daemon.wait_for("STATUS=a new fork server serves", 10), daemon.log_text()
            assert client.call("echo", 5000, {"after": "replacement"}).outcome  # retried until it is back
    finally:
        assert daemon.stop() == 0


def test_json_logs_carry_the_request_id(tmp_path: Path) -> None:
    import json

    daemon = start_daemon(tmp_path / "d", 'log_format = "json"\n')
    try:
        with daemon.client() as client:
            client.call("echo", 5000, request_id="json-log-1")
        assert wait_until(lambda: "json-log-1" in daemon.log_text(), 5)
        entries = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
        finished = next(e for e in entries if e.get("request_id") == "json-log-1")
        assert finished["level"] == "INFO" and "task echo finished: outcome=true" in finished["message"]
    finally:
        assert daemon.stop() == 0


def test_a_new_start_cleans_up_after_a_killed_daemon(tmp_path: Path) -> None:
    base = tmp_path / "work"
    config = f'workdir_base = "{base}"\n'
    pidfile = tmp_path / "pids"
    first = start_daemon(tmp_path / "first", config)
    with first.client() as client, ThreadPoolExecutor(1) as pool:
        pool.submit(client.call, "write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60})
        assert wait_until(lambda: read_pids(pidfile), 10)
        assert (base / str(first.process.pid)).is_dir()
        first.process.kill()
        first.stop()
    second = start_daemon(tmp_path / "second", config)
    try:
        assert not (base / str(first.process.pid)).exists()
        assert "left behind by a daemon that is gone" in second.log_text()
        assert wait_gone(read_pids(pidfile)) == []
    finally:
        assert second.stop() == 0


def test_drain_grace_over_cancels_running_tasks(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "drain_grace_s = 1")
    pidfile = tmp_path / "pids"
    try:
        with daemon.client() as client, ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.call, "write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60})
            assert wait_until(lambda: read_pids(pidfile), 10)
            daemon.process.send_signal(signal.SIGTERM)
            with pytest.raises(TaskCancelled):
                running.result(timeout=30)
        assert daemon.process.wait(30) == 0
        assert "drain grace over: cancelling 1 running tasks" in daemon.log_text()
        assert wait_gone(read_pids(pidfile)) == []
    finally:
        daemon.stop()


def test_insecure_allows_an_exposed_address_and_says_so(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", args=("--listen", "0.0.0.0:0", "--insecure"))
    try:
        assert "insecure = true: anyone who can reach" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


def test_tasks_from_the_command_line_and_entry_points(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", args=("--task", "extra=tests.tasks.faults:echo"))
    try:
        with daemon.client() as client:
            assert client.call("extra", 5000, {"a": 1}).result == {"options": {"a": 1}}
            tasks = {t.name: t.description for t in client.tasks()}
        assert tasks["fail"].startswith("Raise RuntimeError")  # an example task, from the entry points
    finally:
        assert daemon.stop() == 0
    daemon = start_daemon(tmp_path / "e", "entry_points = false\n")
    try:
        with daemon.client() as client:
            assert "fail" not in {t.name for t in client.tasks()}
    finally:
        assert daemon.stop() == 0


def test_a_reload_takes_the_new_drain_grace(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "drain_grace_s = 120")
    pidfile = tmp_path / "pids"
    try:
        config = tmp_path / "d" / "config.toml"
        config.write_text(config.read_text().replace("drain_grace_s = 120", "drain_grace_s = 1"))
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for("STATUS=reloaded"), daemon.log_text()
        with daemon.client() as client, ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.call, "write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60})
            assert wait_until(lambda: read_pids(pidfile), 10)
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(30) == 0
            assert time.monotonic() - started < 1 + 10  # the reloaded grace, not the 120 s of the start
            with pytest.raises(TaskCancelled):
                running.result(10)
    finally:
        daemon.stop()

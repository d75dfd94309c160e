"""The in-process tier: the daemon embedded in this process, over real gRPC, its own objects in view."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from task_runner.client import Client, Unavailable
from task_runner.client.retry import NO_RETRY
from task_runner.server.daemon import Daemon
from task_runner.server.trees import children
from tests.conftest import read_pids, wait_until, write_config
from tests.inprocess import InProcessDaemon

PR_GET_DUMPABLE = 3
PR_GET_CHILD_SUBREAPER = 37


def config_text(directory: Path, extra: str = "") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory / "tasks.toml", f'cgroup = "off"\n{extra}').read_text()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[InProcessDaemon]:
    with InProcessDaemon(tmp_path / "d", config_text(tmp_path / "d", "drain_grace_s = 20")) as d:
        yield d


def process_state() -> tuple[object, ...]:
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(subreaper), 0, 0, 0)
    handlers = tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), subreaper.value, handlers


def test_an_embedded_daemon_serves_over_real_grpc(embedded: InProcessDaemon) -> None:
    with embedded.client() as client:
        assert client.call("echo", 5000, {"n": 1}).result == {"options": {"n": 1}}
        tasks = {task.name: task for task in client.tasks()}
    assert "echo" in tasks and "Traceback" in tasks["broken_import"].import_error
    assert list(embedded.daemon.executor.generation.tasks) == sorted(tasks)


def test_embedding_changes_nothing_process_wide(tmp_path: Path) -> None:
    before = process_state()
    with InProcessDaemon(tmp_path / "d", config_text(tmp_path / "d")) as d, d.client() as client:
        assert client.call("echo", 5000).outcome
        assert process_state() == before  # no signal handler, still dumpable, not a subreaper
    assert process_state() == before


def test_building_a_daemon_does_nothing_until_it_starts(tmp_path: Path) -> None:
    from task_runner.server.config import load

    workdirs, socket_path = tmp_path / "work", tmp_path / "d.sock"
    config_file = tmp_path / "c.toml"
    config_file.write_text(config_text(tmp_path / "t", f'workdir_base = "{workdirs}"'))
    before = children()
    daemon = Daemon(load(config_file, listen=[f"unix:{socket_path}"]), own_process=False)
    assert not workdirs.exists() and not socket_path.exists()
    assert children() == before  # no fork server yet
    with pytest.raises(RuntimeError, match="not started"):
        _ = daemon.executor


def test_drain_refuses_new_calls_and_lets_running_ones_finish(embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "write_pid_and_sleep", 30_000, {"pidfile": str(pidfile), "s": 1})
        assert wait_until(lambda: read_pids(pidfile), 10)
        embedded.request_stop()
        assert embedded.notifier.wait_for("STOPPING=1")
        with Client(embedded.unix, retry=NO_RETRY) as once, pytest.raises(Unavailable, match="shutting down"):
            once.call("echo", 5000)
        assert running.result(timeout=30).outcome is True
    assert embedded.notifier.wait_for("STATUS=draining")


def test_one_count_of_what_runs(embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    executor = embedded.daemon.executor
    registry = embedded.daemon.metrics.registry
    with embedded.client() as client, ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(client.call, "write_pid_and_sleep", 30_000, {"pidfile": str(pidfile), "s": 1.5})
                 for _ in range(3)]
        assert wait_until(lambda: len(read_pids(pidfile)) == 3, 10)
        assert executor.admission.running == 3
        assert registry.get_sample_value("task_runner_tasks_running") == 3
        assert all(call.result(timeout=30).outcome for call in calls)
    # The slot is given back once the process is reaped, just after the answer.
    assert wait_until(lambda: executor.admission.running == 0, 10)
    assert registry.get_sample_value("task_runner_tasks_running") == 0


def test_a_reload_swaps_the_whole_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "generation_task.py"
    module.write_text("import time\ndef version(options):\n    time.sleep(options.get('s', 0))\n"
                      "    return True, {'version': 1}\n")
    monkeypatch.syspath_prepend(str(code))  # the fork server gets this process's sys.path
    directory = tmp_path / "d"
    text = config_text(directory) + '\n[tasks.version]\ntarget = "generation_task:version"\n'
    with InProcessDaemon(directory, text) as d, d.client() as client, ThreadPoolExecutor(1) as pool:
        first = d.daemon.executor.generation
        in_flight = pool.submit(client.call, "version", 10_000, {"s": 1.0})
        assert wait_until(lambda: d.daemon.executor.admission.running == 1, 10)
        module.write_text("def version(options):\n    return True, {'version': 2}\n")
        mark = len(d.notifier.states)
        d.request_reload()
        assert d.notifier.wait_for("STATUS=reloaded", after=mark)
        second = d.daemon.executor.generation
        assert second.number == first.number + 1
        assert second.config is not first.config and second.forkserver is not first.forkserver
        assert client.call("version", 5000).result == {"version": 2}
        assert in_flight.result(timeout=30).result == {"version": 1}  # finished on the generation it began on
        assert wait_until(first.forkserver.closed.is_set, 10)  # and that generation ended after it
        assert not second.forkserver.closed.is_set()

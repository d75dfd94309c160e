"""Promises kept under retries, overload, cancellation and the loss of a daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from task_runner.client import NO_RETRY, AsyncClient, Client, InvalidRequest, RetryPolicy, TaskException
from task_runner.v1 import task_runner_pb2 as pb
from tests.conftest import REPO, Daemon, read_pids, start_daemon, wait_gone, wait_until


def runs(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def test_same_request_id_attaches_to_the_running_execution(client: Client, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    options = {"file": str(counter), "ms": 500}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: client.call("count_runs", 10_000, options, request_id="same-1"), range(3)))
    assert runs(counter) == 1
    assert len({a.result["token"] for a in answers}) == 1
    again = client.call("count_runs", 10_000, options, request_id="same-1")  # after the end: from the cache
    assert again.result == answers[0].result and runs(counter) == 1
    fresh = client.call("count_runs", 10_000, options, request_id="other-1")
    assert fresh.result != answers[0].result and runs(counter) == 2


def test_request_id_reused_for_another_request_is_refused(client: Client, tmp_path: Path) -> None:
    client.call("echo", 5000, {"a": 1}, request_id="reuse-1")
    with pytest.raises(InvalidRequest, match="used for a different request"):
        client.call("echo", 5000, {"a": 2}, request_id="reuse-1")


def test_task_failures_are_retried_only_when_asked(client: Client, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    with pytest.raises(TaskException, match="flaky failure 1"):
        client.call("flaky", 5000, {"file": str(counter), "fail_times": 2})
    assert runs(counter) == 1
    answer = client.call("flaky", 5000, {"file": str(counter), "fail_times": 3}, retries=3)
    assert answer.result == {"runs": 4} and runs(counter) == 4
    assert answer.request_id.endswith("#retry2")


def test_outcome_false_is_never_retried(client: Client, tmp_path: Path) -> None:
    assert client.call("reject", 5000, retries=5).outcome is False


def test_transport_failures_are_retried_with_the_same_request_id(tmp_path: Path) -> None:
    socket_path = tmp_path / "d" / "daemon.sock"
    patient = RetryPolicy(transport_attempts=30, initial_backoff_s=0.05, max_backoff_s=0.5)
    result: dict[str, object] = {}

    def call() -> None:
        with Client(f"unix:{socket_path}", retry=patient) as client:
            result["answer"] = client.call("echo", 5000, {"x": 1}, request_id="early-bird")

    caller = threading.Thread(target=call)
    caller.start()  # the daemon is not there yet: UNAVAILABLE, retried
    daemon = start_daemon(tmp_path / "d")
    try:
        caller.join(30)
        answer = result["answer"]
        assert answer.result == {"options": {"x": 1}} and answer.request_id == "early-bird"  # type: ignore[attr-defined]
    finally:
        assert daemon.stop() == 0


def test_overload_every_request_answered(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "max_running = 4\nmax_queued = 100\n")

    async def flood() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with grpc.aio.insecure_channel(daemon.unix) as channel:
            perform = channel.unary_unary(
                "/task_runner.v1.TaskRunner/Perform",
                request_serializer=pb.PerformRequest.SerializeToString,
                response_deserializer=pb.PerformResponse.FromString,
            )
            request = pb.PerformRequest(task="sleep", timeout_ms=10_000)
            request.options.update({"ms": 20})

            async def one() -> str:
                try:
                    response = await perform(request, timeout=120)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "OK" if response.outcome else "not ok"

            for status in await asyncio.gather(*(one() for _ in range(5000))):
                counts[status] = counts.get(status, 0) + 1
        return counts

    try:
        counts = asyncio.run(flood())
        assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
        assert sum(counts.values()) == 5000 and counts["OK"] >= 104 and counts.get("RESOURCE_EXHAUSTED", 0) > 0, counts
        with daemon.client() as client:
            assert client.call("echo", 5000).outcome  # healthy afterwards
    finally:
        assert daemon.stop() == 0


def test_client_process_dying_mid_call_kills_the_task(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "max_running = 1\nmax_queued = 0\n")
    pidfile = tmp_path / "pids"
    script = (
        "import sys; from task_runner.client import Client\n"
        f"Client({daemon.unix!r}).call('write_pid_and_sleep', 60000, {{'pidfile': {str(pidfile)!r}, 's': 60}},"
        " request_id='doomed-caller')\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert wait_until(lambda: read_pids(pidfile), 20)
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        assert wait_gone(read_pids(pidfile), timeout=2) == []  # the task is killed (within ms, in practice)
        assert wait_until(lambda: "error=CANCELLED" in daemon.log_text(), 5)
        line = next(line for line in daemon.log_text().splitlines() if "error=CANCELLED" in line)
        assert "doomed-caller" in line
        with Client(daemon.unix, retry=NO_RETRY) as client:
            assert client.call("echo", 5000).outcome  # its only slot is free again
    finally:
        caller.kill()
        assert daemon.stop() == 0


def test_three_daemons_one_killed_every_call_completes_once(tmp_path: Path) -> None:
    daemons = [start_daemon(tmp_path / f"d{i}") for i in range(3)]
    counter = tmp_path / "runs"
    try:
        answers: list[str] = []
        killed = asyncio.Event()

        async def stream() -> None:
            async with AsyncClient([d.tcp for d in daemons],
                                   retry=RetryPolicy(transport_attempts=10, max_backoff_s=0.5)) as client:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(1000):
                    queue.put_nowait(i)

                async def worker() -> None:
                    while not queue.empty():
                        i = queue.get_nowait()
                        if i == 300 and not killed.is_set():
                            killed.set()
                            daemons[1].process.send_signal(signal.SIGKILL)
                        answer = await client.call("count_runs", 10_000, {"file": str(counter)},
                                                   request_id=f"call-{i}")
                        answers.append(answer.request_id)

                await asyncio.gather(*(worker() for _ in range(16)))

        asyncio.run(stream())
        assert killed.is_set()
        assert sorted(answers) == sorted(f"call-{i}" for i in range(1000))  # each answered once
        # A call may have run on the killed daemon before its answer was lost; it ran again elsewhere.
        assert 1000 <= runs(counter) <= 1000 + 16
    finally:
        for d in daemons:
            d.stop()


def test_a_cancelled_answer_is_not_kept(daemon: Daemon, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    options = {"file": str(counter), "ms": 3000}
    with grpc.insecure_channel(daemon.unix) as channel:
        perform = channel.unary_unary(
            "/task_runner.v1.TaskRunner/Perform",
            request_serializer=pb.PerformRequest.SerializeToString,
            response_deserializer=pb.PerformResponse.FromString,
        )
        request = pb.PerformRequest(task="count_runs", timeout_ms=10_000, request_id="cancel-then-retry")
        request.options.update(options)
        future = perform.future(request, timeout=30)
        assert wait_until(lambda: runs(counter) == 1, 10)
        future.cancel()
    assert wait_until(lambda: "error=CANCELLED" in daemon.log_text(), 5)
    with Client(daemon.unix) as client:  # a retry under the same id runs the task again: the caller went away
        retried = client.call("count_runs", 10_000, options, request_id="cancel-then-retry")
    assert retried.outcome and runs(counter) == 2


def test_a_task_that_answers_but_lingers_is_killed(client: Client, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    assert client.call("answer_then_linger", 10_000, {"pidfile": str(pidfile)}).outcome is True
    assert wait_gone(read_pids(pidfile), timeout=5) == []


def test_a_fork_server_ends_with_a_daemon_killed_while_it_imports_the_tasks(tmp_path: Path) -> None:
    """Killed before the fork server reads its socket's end (it imports a task module that hangs), the daemon
    leaves no fork server behind: it dies with its parent."""
    import psutil

    marker = tmp_path / "importing"
    (tmp_path / "hangs_at_import.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).write_text('x')\ntime.sleep(120)\n"
        "def never(options):\n    return True\n")
    config = tmp_path / "config.toml"
    config.write_text('cgroup = "off"\nentry_points = false\n[sandbox]\nwritable = []\n'
                      '[tasks.never]\ntarget = "hangs_at_import:never"\n')
    daemon = subprocess.Popen([sys.executable, "-m", "task_runner.server", "--config", str(config),
                               "--listen", f"unix:{tmp_path / 'd.sock'}"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    forkserver = None
    try:
        assert wait_until(marker.exists, 30)  # the fork server is importing the module, which hangs
        (forkserver,) = psutil.Process(daemon.pid).children()
        daemon.kill()
        daemon.wait()
        assert wait_until(lambda: not forkserver.is_running() or forkserver.status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        daemon.kill()
        daemon.wait()
        if forkserver is not None and forkserver.is_running():
            forkserver.kill()

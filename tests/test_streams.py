"""Talking to a running task over real gRPC: PerformStream's events, Watch, Cancel, the notice, STALLED."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from task_runner.client import (
    Client,
    Finished,
    Gap,
    Heartbeat,
    Output,
    Progress,
    Queued,
    Started,
    TaskCancelled,
    TaskNotFound,
    TaskStalled,
    TaskTimeout,
)
from tests.conftest import read_pids, start_daemon, wait_gone, wait_until, write_config
from tests.inprocess import InProcessDaemon


def daemon(tmp_path: Path, settings: str = "", tables: str = "") -> InProcessDaemon:
    directory = tmp_path / "d"
    directory.mkdir(parents=True, exist_ok=True)
    text = write_config(directory / "tasks.toml", f'cgroup = "off"\n{settings}').read_text()
    return InProcessDaemon(directory, text + tables)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[InProcessDaemon]:
    tables = ('[tasks.stalls]\ntarget = "tests.tasks.faults:heartbeat_then_hang"\nheartbeat_timeout_ms = 300\n'
              '[tasks.graceful]\ntarget = "tests.tasks.faults:until_cancelled"\ngrace_ms = 500\n')
    with daemon(tmp_path, "max_running = 4\n", tables) as d:
        yield d


def test_a_stream_carries_each_event_kind_in_order_and_the_response_last(embedded: InProcessDaemon) -> None:
    with embedded.client() as client:
        events = list(client.stream("chatty", 10_000, request_id="chatty-1"))
    kinds = [type(e) for e in events]
    assert kinds[0] is Started and kinds[-1] is Finished and kinds.count(Finished) == 1
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})  # in order, none twice
    progress = next(e for e in events if isinstance(e, Progress))
    assert (progress.fraction, progress.stage, progress.details) == (0.5, "half", {"k": 1})
    assert next(e for e in events if isinstance(e, Heartbeat)).details == {"n": 1}
    printed = {stream: b"".join(e.data for e in events if isinstance(e, Output) and e.stream == stream)
               for stream in ("stdout", "stderr")}
    assert printed == {"stdout": b"out-line\n", "stderr": b"err-line\n"}
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.result is not None
    assert finished.result.result == {"request_id": "chatty-1"}  # the task knows its request id
    assert finished.result.stdout == b"out-line\n"  # the very response the unary Perform gives
    assert all(e.time_ms >= 0 for e in events) and events[-1].time_ms >= events[0].time_ms


def test_a_call_that_waits_says_so_first(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(client.call, "gated_progress", 30_000, {"gate": str(gate)})
        assert wait_until(lambda: d.daemon.executor.admission.running == 1, 10)
        first = pool.submit(lambda: list(client.stream("echo", 5000)))
        assert wait_until(lambda: d.daemon.executor.admission.queued == 1, 10)
        second = pool.submit(lambda: list(client.stream("echo", 5000)))
        assert wait_until(lambda: d.daemon.executor.admission.queued == 2, 10)
        gate.touch()
        assert blocker.result(timeout=30).outcome
        for stream, position in ((first, 0), (second, 1)):
            events = stream.result(timeout=30)
            assert isinstance(events[0], Queued) and events[0].position == position
            assert isinstance(events[1], Started) and isinstance(events[-1], Finished)


def test_watch_from_another_connection_mid_run_and_after_the_end(embedded: InProcessDaemon, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "gated_progress", 30_000, {"gate": str(gate)}, request_id="watched")
        assert wait_until(lambda: embedded.daemon.executor.admission.running == 1, 10)  # it has arrived
        with Client(embedded.unix) as other:
            seen: list[object] = []
            stream = other.watch("watched")
            for event in stream:  # what was buffered comes first: the start and the first progress
                seen.append(event)
                if isinstance(event, Progress):
                    break
            gate.touch()  # then it follows live
            seen += list(stream)
        assert running.result(timeout=30).outcome
        assert isinstance(seen[0], Started) and isinstance(seen[-1], Finished)
        assert [e.stage for e in seen if isinstance(e, Progress)] == ["waiting", "done"]
        with Client(embedded.unix) as late:  # after the end: the same events, replayed
            replay = list(late.watch("watched"))
        assert [e.sequence for e in replay] == [e.sequence for e in seen]
        with pytest.raises(TaskNotFound, match="no execution of request_id 'nobody'"):
            list(client.watch("nobody"))


def test_cancel_with_a_grace_lets_the_task_clean_up_and_answer(embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "until_cancelled", 30_000, {"pidfile": str(pidfile)}, request_id="c1")
        assert wait_until(lambda: len(read_pids(pidfile)) == 2, 10)
        assert client.cancel("c1", grace_ms=5000) is True
        answer = running.result(timeout=30)
        assert answer.outcome is False and answer.result["cleaned"] is True  # its own answer, within the grace
    assert wait_gone(read_pids(pidfile)) == []
    with embedded.client() as client, pytest.raises(TaskNotFound):
        client.cancel("c1")  # it is over


def test_cancel_without_grace_kills_at_once(embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "ignores_notice", 30_000, {"pidfile": str(pidfile)}, request_id="c2")
        assert wait_until(lambda: len(read_pids(pidfile)) == 2, 10)
        began = time.monotonic()
        assert client.cancel("c2") is True
        with pytest.raises(TaskCancelled) as cancelled:
            running.result(timeout=30)
        assert time.monotonic() - began < 2.0 and cancelled.value.notice_given is False
    assert wait_gone(read_pids(pidfile)) == []


def test_a_task_that_ignores_its_notice_is_killed_at_the_end_of_the_grace(
        embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "ignores_notice", 30_000, {"pidfile": str(pidfile)}, request_id="c3")
        assert wait_until(lambda: len(read_pids(pidfile)) == 2, 10)
        began = time.monotonic()
        assert client.cancel("c3", grace_ms=300) is True
        with pytest.raises(TaskCancelled) as cancelled:
            running.result(timeout=30)
        assert 0.3 <= time.monotonic() - began < 3.0
        assert cancelled.value.notice_given is True
    assert wait_gone(read_pids(pidfile)) == []  # nothing left behind: its child went too


def test_a_queued_call_cancelled_leaves_the_queue_and_never_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(client.call, "gated_progress", 30_000, {"gate": str(gate)})
        assert wait_until(lambda: d.daemon.executor.admission.running == 1, 10)
        queued = pool.submit(client.call, "echo", 5000, {}, request_id="q1")
        assert wait_until(lambda: d.daemon.executor.admission.queued == 1, 10)
        assert client.cancel("q1") is False
        with pytest.raises(TaskCancelled, match="before it ran"):
            queued.result(timeout=10)
        assert d.daemon.executor.admission.queued == 0
        gate.touch()
        assert blocker.result(timeout=30).outcome


def test_the_notice_comes_its_grace_before_the_deadline(embedded: InProcessDaemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with embedded.client() as client:
        # "graceful" has grace_ms = 500 in the config: told at 1.0 s of its 1.5 s.
        answer = client.call("graceful", 1500, {"pidfile": str(pidfile)})
        assert answer.outcome is False and answer.result["cleaned"] is True
        assert 0.35 < answer.result["remaining"] <= 0.5
        # A grace as long as the timeout: told the moment it is handed over, before it even starts.
        at_once = client.call("until_cancelled", 1000, {"pidfile": str(pidfile)}, grace_ms=1000)
        assert at_once.outcome is False and at_once.result["cleaned"] is True
        with pytest.raises(TaskTimeout) as timed_out:  # one that ignores it is killed at the deadline
            client.call("ignores_notice", 600, {"pidfile": str(pidfile)}, grace_ms=200)
        assert timed_out.value.notice_given is True
    assert wait_gone(read_pids(pidfile)) == []


def test_an_async_task_hears_the_notice_as_its_coroutine_cancelled(embedded: InProcessDaemon) -> None:
    with embedded.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "async_until_cancelled", 30_000, request_id="a1")
        assert wait_until(lambda: embedded.daemon.executor.admission.running == 1, 10)
        time.sleep(0.2)  # its event loop is running by now (no event tells when)
        assert client.cancel("a1", grace_ms=5000) is True
        answer = running.result(timeout=30)
    assert answer.outcome is False and answer.result == {"cleaned": True}


def test_remaining_is_accurate(embedded: InProcessDaemon) -> None:
    with embedded.client() as client:
        for _ in range(5):
            answer = client.call("remaining_now", 2000)
            expected = 2.0 - answer.usage.wall_ms / 1e3  # the deadline is 2 s after the hand-over
            assert abs(answer.result["remaining"] - expected) < 0.05, (answer.result, answer.usage.wall_ms)


def test_a_task_that_heartbeats_then_goes_silent_is_stalled(embedded: InProcessDaemon) -> None:
    with embedded.client() as client:
        began = time.monotonic()
        with pytest.raises(TaskStalled, match="no heartbeat for 300 ms"):
            client.call("stalls", 20_000)
        assert time.monotonic() - began < 5  # long before its 20 s deadline
        registry = embedded.daemon.metrics.registry
        assert registry.get_sample_value(
            "task_runner_tasks_finished_total",
            {"task": "stalls", "outcome": "", "error_kind": "STALLED", "caller": "default"}) == 1


def test_on_progress_sees_a_tasks_progress(embedded: InProcessDaemon) -> None:
    seen: list[Progress] = []
    done = threading.Event()
    answers: list[object] = []
    with embedded.client() as client:
        assert client.call("chatty", 10_000, on_progress=seen.append).outcome
        assert [(p.fraction, p.stage) for p in seen] == [(0.5, "half")]

        def callback(err: object, outcome: object, result: object) -> None:
            answers.append((err, outcome))
            done.set()
        seen.clear()
        client.perform("chatty", 10_000, {}, callback, on_progress=seen.append)
        assert done.wait(30)
    assert answers == [(None, True)] and [p.stage for p in seen] == ["half"]


def test_a_drain_tells_tasks_with_a_grace_before_it_ends(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    tables = '[tasks.graceful]\ntarget = "tests.tasks.faults:until_cancelled"\ngrace_ms = 500\n'
    with daemon(tmp_path, "drain_grace_s = 1.5\n", tables) as d, d.client() as client, \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.call, "graceful", 60_000, {"pidfile": str(pidfile)})
        assert wait_until(lambda: len(read_pids(pidfile)) == 2, 10)
        d.request_stop()
        answer = running.result(timeout=30)
        assert answer.outcome is False and answer.result["cleaned"] is True
    assert wait_gone(read_pids(pidfile)) == []


def test_a_flood_of_progress_and_output_neither_slows_others_nor_grows_the_daemon(tmp_path: Path) -> None:
    # No answers kept for retries: the idempotency cache's own (bounded) growth would hide the flood's.
    d = start_daemon(tmp_path / "d", 'cgroup = "off"\nmax_running = 8\nidempotency_window_s = 0\n')
    try:
        daemon_process = psutil.Process(d.process.pid)
        with d.client() as client, ThreadPoolExecutor(4) as pool:
            assert client.call("echo", 5000).outcome
            rss = [daemon_process.memory_info().rss]
            latencies: list[float] = []
            streams = []
            for _ in range(3):  # the first round may grow buffers once; the later ones must not
                floods = [pool.submit(lambda task=task: list(client.stream(task, 30_000, {"s": 2})))
                          for task in ("flood", "raw_progress_flood")]
                while not all(f.done() for f in floods):
                    began = time.monotonic()
                    assert client.call("echo", 5000).outcome
                    latencies.append(time.monotonic() - began)
                streams += [f.result() for f in floods]
                rss.append(daemon_process.memory_info().rss)
        assert sorted(latencies)[len(latencies) // 2] < 0.2, sorted(latencies)[len(latencies) // 2]
        assert rss[1] - rss[0] < 30 << 20 and rss[3] - rss[1] < 4 << 20, [r >> 20 for r in rss]  # flat, in MiB
        for events in streams:
            updates = events[-1].result.result["updates"]  # type: ignore[attr-defined]
            progress = [e for e in events if isinstance(e, Progress)]
            assert updates > 10 * len(progress)  # coalesced: the latest of each interval, not every one
            assert len(progress) < 2 / 0.05 + 10  # at most one every 50 ms
        flood = streams[0]  # the one printing as fast as it can lost output, and says how much
        assert any(isinstance(e, Output) and e.dropped_bytes for e in flood) or any(isinstance(e, Gap) for e in flood)
    finally:
        assert d.stop() == 0, d.log_text()


def test_the_cli_follows_watches_and_cancels(embedded: InProcessDaemon, tmp_path: Path) -> None:
    import json
    import re
    import subprocess
    import sys

    from tests.conftest import REPO

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "task_runner.client.cli", *args, "--target", embedded.unix],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    followed = cli("perform", "chatty", "--follow", "--request-id", "cli-1")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.startswith("out-line\n")  # the task's output as it came, then the answer
    assert json.loads(followed.stdout.removeprefix("out-line\n"))["result"] == {"request_id": "cli-1"}
    lines = followed.stderr.splitlines()  # not a terminal: one plain line per event
    assert "err-line" in lines
    assert any(re.search(r"^\[ *[0-9.]+ s\] started \(pid \d+\)$", line) for line in lines), lines
    progress = next(line for line in lines if "progress 50% half" in line)
    assert re.search(r"progress 50% half \(\d+ s to the deadline, about \d+ s to go\)$", progress), progress
    assert any("heartbeat" in line for line in lines)
    watched = cli("watch", "cli-1")  # finished within the idempotency window: replayed
    assert watched.returncode == 0 and json.loads(watched.stdout.removeprefix("out-line\n"))["outcome"] is True

    pidfile = tmp_path / "pids"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(cli, "perform", "until_cancelled", "--options", json.dumps({"pidfile": str(pidfile)}),
                              "--request-id", "cli-2")
        assert wait_until(lambda: len(read_pids(pidfile)) == 2, 20)
        cancelled = cli("cancel", "cli-2", "--grace", "5000", "--json")
        assert cancelled.returncode == 0 and json.loads(cancelled.stdout) == {"request_id": "cli-2",
                                                                              "was_running": True}
        done = running.result(timeout=60)
    assert done.returncode == 1 and json.loads(done.stdout)["result"]["cleaned"] is True  # outcome false
    assert cli("cancel", "cli-2").returncode == 66  # over: NOT_FOUND


def test_the_asyncio_client_streams_watches_cancels_and_sees_progress(
        embedded: InProcessDaemon, tmp_path: Path) -> None:
    import asyncio

    from task_runner.client import AsyncClient

    pidfile = tmp_path / "pids"

    async def scenario() -> None:
        async with AsyncClient(embedded.unix) as client:
            events = [event async for event in client.stream("chatty", 10_000, request_id="aio-1")]
            assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
            replay = [event async for event in client.watch("aio-1")]
            assert [e.sequence for e in replay] == [e.sequence for e in events]
            seen: list[Progress] = []
            assert (await client.call("chatty", 10_000, on_progress=seen.append)).outcome
            assert [p.stage for p in seen] == ["half"]
            running = asyncio.ensure_future(client.call("until_cancelled", 30_000, {"pidfile": str(pidfile)},
                                                        request_id="aio-2"))
            await asyncio.to_thread(wait_until, lambda: len(read_pids(pidfile)) == 2, 10)
            assert await client.cancel("aio-2", grace_ms=5000) is True
            assert (await running).result["cleaned"] is True

    asyncio.run(scenario())
    assert wait_gone(read_pids(pidfile)) == []


def test_a_watch_of_a_call_whose_callers_left_in_the_queue_ends_saying_so(tmp_path: Path) -> None:
    from task_runner.client import DeadlineExceeded
    from task_runner.client.retry import NO_RETRY

    gate = tmp_path / "gate"
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(client.call, "gated_progress", 30_000, {"gate": str(gate)})
        assert wait_until(lambda: d.daemon.executor.admission.running == 1, 10)
        with Client(d.unix, retry=NO_RETRY) as once:
            leaving = pool.submit(once.call, "echo", 5000, {}, request_id="left", rpc_timeout=1.0)
            assert wait_until(lambda: d.daemon.executor.admission.queued == 1, 10)
            watched = pool.submit(lambda: list(client.watch("left")))
            with pytest.raises(DeadlineExceeded):
                leaving.result(timeout=10)
            with pytest.raises(TaskNotFound, match="every caller left"):
                watched.result(timeout=10)
        gate.touch()
        assert blocker.result(timeout=30).outcome

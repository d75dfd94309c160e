"""A fleet: three daemons on this machine and clients over all three, balancing by request id (gRPC's
ring_hash on the task-runner-request-id metadata), so that a call, its retries, its Watch and its Cancel reach
one daemon; a daemon that drains or dies gives its traffic to the others (issue "Past one process and one
machine")."""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from task_runner.client import AsyncClient, Client, Started, TaskCancelled, TaskNotFound, TaskResult, Unavailable
from task_runner.client.retry import NO_RETRY
from tests.conftest import Daemon, start_daemon, wait_until

# The access log's line of a call that ran on its daemon and was answered there (a refusal is no run).
PERFORMED = re.compile(r"method=Perform request_id=(\S+) .*status=OK .*shared=False")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons = [start_daemon(tmp_path / f"d{i}", 'cgroup = "off"\n') for i in range(3)]
    try:
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()  # a stopped or killed one too: its notify socket is closed


def ran_on(daemons: list[Daemon]) -> dict[str, int]:
    """Which daemon ran each request id (its access log's Perform lines that ran it), by request id."""
    where: dict[str, int] = {}
    for index, daemon in enumerate(daemons):
        for request_id in PERFORMED.findall(daemon.log_text()):
            assert request_id not in where, f"{request_id} ran on daemons {where[request_id]} and {index}"
            where[request_id] = index
    return where


def running_on(daemons: list[Daemon], request_id: str) -> int | None:
    """The daemon that runs (or ran) `request_id`, asked of each directly."""
    for index, daemon in enumerate(daemons):
        if daemon.process.poll() is not None:
            continue
        with Client(daemon.unix, retry=NO_RETRY) as direct:
            try:
                events = direct.watch(request_id)
                next(events)
                events.close()
            except TaskNotFound:
                continue
            return index
    return None


def targets(daemons: list[Daemon]) -> list[str]:
    return [daemon.tcp for daemon in daemons]


def test_calls_spread_over_the_fleet_and_each_id_keeps_its_daemon(fleet: list[Daemon]) -> None:
    with Client(targets(fleet)) as client, Client(targets(fleet)) as other:
        for i in range(60):
            assert client.call("echo", 5000, {"i": i}, request_id=f"spread-{i}").outcome
        for i in range(0, 60, 6):  # a retry of the id from another client: the same daemon's kept answer
            assert other.call("echo", 5000, {"i": i}, request_id=f"spread-{i}").result == {"options": {"i": i}}
    where = ran_on(fleet)
    assert sorted(where) == sorted(f"spread-{i}" for i in range(60))  # each ran once, on one daemon
    spread = Counter(where.values())
    assert set(spread) == {0, 1, 2} and min(spread.values()) >= 5, spread


def test_watch_and_cancel_from_another_client_reach_the_calls_daemon(fleet: list[Daemon], tmp_path: Path) -> None:
    ids = [f"long-{i}" for i in range(9)]
    with Client(targets(fleet)) as client, Client(targets(fleet)) as other, ThreadPoolExecutor(len(ids)) as pool:
        calls = {rid: pool.submit(client.call, "sleep", 60_000, {"ms": 30_000}, request_id=rid) for rid in ids}
        assert wait_until(lambda: all(running_on(fleet, rid) is not None for rid in ids), 20)  # they have arrived
        for rid in ids:
            events = other.watch(rid)  # never NOT_FOUND: it reaches the daemon that runs the call
            assert any(isinstance(event, Started) for event in events)
            events.close()
        for rid in ids:
            assert other.cancel(rid) is True
        for call in calls.values():
            with pytest.raises(TaskCancelled):
                call.result(timeout=30)
    assert len(set(ran_on(fleet).values())) >= 2  # they were spread, and each was still found


def test_a_draining_daemon_loses_no_call(fleet: list[Daemon]) -> None:
    async def burst() -> list[TaskResult | BaseException]:
        async with AsyncClient(targets(fleet)) as client:
            calls = [asyncio.ensure_future(client.call("sleep", 30_000, {"ms": 300}, request_id=f"drain-{i}"))
                     for i in range(60)]
            await asyncio.sleep(0.5)  # mid-burst
            fleet[0].process.send_signal(signal.SIGTERM)
            calls += [asyncio.ensure_future(client.call("sleep", 30_000, {"ms": 100}, request_id=f"after-{i}"))
                      for i in range(30)]
            return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(burst())
    assert all(isinstance(r, TaskResult) and r.outcome for r in results), [r for r in results
                                                                          if not isinstance(r, TaskResult)]
    assert fleet[0].process.wait(timeout=60) == 0
    where = ran_on(fleet)
    assert len(where) == 90  # each ran once: none lost, none twice
    assert {where[f"drain-{i}"] for i in range(60)} == {0, 1, 2}  # the drained daemon had its share


def test_a_killed_daemons_calls_fail_unavailable_and_the_next_go_elsewhere(fleet: list[Daemon]) -> None:
    ids = [f"doomed-{i}" for i in range(12)]
    with Client(targets(fleet)) as client, ThreadPoolExecutor(len(ids)) as pool:
        calls = {rid: pool.submit(client.call, "sleep", 60_000, {"ms": 8_000}, request_id=rid) for rid in ids}
        where: dict[str, int | None] = {}

        def located() -> bool:
            where.update({rid: running_on(fleet, rid) for rid in ids})
            return None not in where.values()
        assert wait_until(located, 20)
        victim = Counter(where.values()).most_common(1)[0][0]
        on_victim = {rid for rid, index in where.items() if index == victim}
        fleet[victim].process.kill()
        fleet[victim].process.wait(timeout=10)
        for rid in on_victim:  # lost with their daemon, never silently run again elsewhere
            with pytest.raises(Unavailable) as lost:
                calls[rid].result(timeout=30)
            assert lost.value.may_have_run
        for i in range(20):  # the rest of the fleet takes the next calls
            assert client.call("echo", 5000, request_id=f"next-{i}").outcome
        for daemon in fleet:
            if daemon.process.poll() is None:
                for rid in on_victim:
                    assert f"method=Perform request_id={rid} " not in daemon.log_text()
        for rid in set(ids) - on_victim:
            calls[rid].result(timeout=60)


def test_the_daemon_takes_the_request_id_from_the_header_and_refuses_a_disagreement(daemon: Daemon) -> None:
    import grpc

    from task_runner.v1 import task_runner_pb2 as pb
    from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub

    with grpc.insecure_channel(daemon.unix) as channel:
        stub = TaskRunnerStub(channel)
        answered = stub.Perform(pb.PerformRequest(task="echo", timeout_ms=5000),
                                metadata=(("task-runner-request-id", "from-header"),), timeout=30)
        assert answered.request_id == "from-header"
        again = stub.Perform(pb.PerformRequest(task="echo", timeout_ms=5000, request_id="from-header"),
                             metadata=(("task-runner-request-id", "from-header"),), timeout=30)
        assert again.request_id == "from-header"  # both, agreeing
        with pytest.raises(grpc.RpcError) as refused:
            stub.Perform(pb.PerformRequest(task="echo", timeout_ms=5000, request_id="field"),
                         metadata=(("task-runner-request-id", "header"),), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task-runner-request-id" in (refused.value.details() or "")
        watched = list(stub.Watch(pb.WatchRequest(), metadata=(("task-runner-request-id", "from-header"),),
                                  timeout=30))
        assert watched[-1].HasField("response")  # Watch and Cancel take it from the header too

"""The registry of live executions (task_runner.server.executions.Executions): what an unanswered execution is
found by, when its slot comes free (its process reaped, or its settling without one), when it is gone, and the
room its request holds while it waits. Its runs are real Runs over a socket pair (tests/test_run.py's `task`),
their exits reported as the fork server reports a reaped process; the last test is a real daemon's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from task_runner.client import Client, DeadlineExceeded, TaskCancelled, TaskException
from task_runner.client.retry import NO_RETRY
from task_runner.server.admission import Admission
from task_runner.server.callers import Caller, Callers
from task_runner.server.events import EventLog
from task_runner.server.execution import Generation
from task_runner.server.executions import QUEUED_CALL_BYTES, Execution, Executions
from tests.conftest import wait_until, write_config
from tests.inprocess import InProcessDaemon
from tests.test_run import CONFIG, Task, task

NOW = 1000.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def execution(request_id: str, caller: str = "reports", request: bytes = b"request") -> Execution:
    return Execution(request_id, "echo", Caller(caller), b"digest", request, NOW, EventLog(NOW),
                     attachable=True)


@contextmanager
def task_process() -> Iterator[Task]:
    """A task process's run; its daemon's ends closed at the end, as the fork server client closes a reaped one's."""
    with task() as made:
        try:
            yield made
        finally:
            made.process.close()


def generation(number: int, made: Task) -> Generation:
    return Generation(number, CONFIG, made.server, Callers(()))  # type: ignore[arg-type]


async def admitted(admission: Admission, executions: Executions, running: Execution) -> None:
    await admission.acquire(running.task, caller=running.caller.name)
    executions.admitted(running, asyncio.get_running_loop().time())


async def running_in(made: Task, admission: Admission, executions: Executions) -> Execution:
    """An execution opened, admitted and started in `made`'s run, as the executor takes one through its phases."""
    running = execution("r1")
    executions.open(running)
    await admitted(admission, executions, running)
    executions.started(running, made.run, generation(1, made))
    return running


async def reaped(made: Task) -> None:
    """The task process exits, and the registry has heard (its callback runs before ours: added first)."""
    heard = asyncio.Event()
    made.process.exited.add_done_callback(lambda _: heard.set())
    made.exits(0)
    await heard.wait()


def answered(settled: Execution, executions: Executions) -> None:
    settled.answer.set_result(b"the answer")
    executions.settle(settled)


def test_an_unanswered_execution_is_found_by_its_callers_key_and_by_a_scan_until_it_is_answered() -> None:
    async def test() -> None:
        executions = Executions(Admission(1, 10, 10.0))
        theirs = execution("r1", caller="billing")
        executions.open(theirs)
        assert executions.find(("billing", "r1")) is executions.attachable(("billing", "r1")) is theirs
        assert executions.find(("reports", "r1")) is None  # a request_id is its caller's own
        assert executions.find_any("r1") is theirs and executions.find_any("r2") is None
        executions.forget(theirs)  # every caller left: a retry starts afresh, a Watch or Cancel still finds it
        assert executions.attachable(("billing", "r1")) is None and executions.find(("billing", "r1")) is theirs
        answered(theirs, executions)
        assert executions.find(("billing", "r1")) is None and executions.find_any("r1") is None
        assert len(executions) == 0  # it took no process: gone once answered
    run(test)


def test_a_retry_after_every_caller_left_is_the_one_found_while_the_old_one_is_still_held() -> None:
    async def test() -> None:
        executions = Executions(Admission(1, 10, 10.0))
        old, new = execution("r1"), execution("r1")
        executions.open(old)
        executions.forget(old)
        executions.open(new)
        assert executions.attachable(("reports", "r1")) is new and len(executions) == 2
        answered(old, executions)  # the old one's end leaves the new one findable
        assert executions.find(("reports", "r1")) is new and list(executions) == [new]
    run(test)


@pytest.mark.parametrize("reaped_first", [False, True], ids=["answered-first", "reaped-first"])
def test_the_slot_comes_free_when_the_process_is_reaped_and_the_execution_goes_once_answered_too(
        reaped_first: bool) -> None:
    async def test() -> None:
        admission = Admission(1, 10, 10.0)
        executions = Executions(admission)
        with task_process() as made:
            running = await running_in(made, admission, executions)
            if reaped_first:
                await reaped(made)
                assert admission.running == 0 and executions.runs() == []
                assert list(executions) == [running] and executions.find(("reports", "r1")) is running
                answered(running, executions)
            else:
                answered(running, executions)  # not the slot's end: the process still runs
                assert admission.running == 1 and executions.runs() == [made.run] and list(executions) == [running]
                await reaped(made)
            assert admission.running == 0 and executions.runs() == [] and len(executions) == 0
            await asyncio.wait_for(admission.wait_idle(), 1)
    run(test)


def test_an_execution_settled_without_a_process_gives_its_slot_back_at_once_and_once() -> None:
    async def test() -> None:
        admission = Admission(1, 10, 10.0)
        executions = Executions(admission)
        refused = execution("r1")
        executions.open(refused)
        await admitted(admission, executions, refused)
        queued = asyncio.Event()
        waiting = asyncio.ensure_future(admission.acquire("echo", on_wait=lambda _: queued.set(), caller="reports"))
        await queued.wait()  # it waits behind the slot held
        assert admission.queued == 1
        answered(refused, executions)
        await asyncio.wait_for(waiting, 1)  # the slot went to the call waiting
        assert admission.running == 1 and admission.queued == 0 and len(executions) == 0
        executions.settle(refused)  # settled twice: the slot is not given back twice
        assert admission.running == 1
    run(test)


def test_the_runs_of_a_generation_are_those_of_its_processes_not_yet_reaped() -> None:
    async def test() -> None:
        executions = Executions(Admission(2, 10, 10.0))
        with task_process() as first_task, task_process() as second_task:
            first, second = generation(1, first_task), generation(2, second_task)
            for number, (made, of) in enumerate(((first_task, first), (second_task, second))):
                running = execution(f"r{number}")
                executions.open(running)
                executions.started(running, made.run, of)
            assert executions.runs(first) == [first_task.run] and executions.runs(second) == [second_task.run]
            assert executions.runs() == [first_task.run, second_task.run]
            await reaped(first_task)
            assert executions.runs(first) == [] and executions.runs() == [second_task.run]
    run(test)


def test_a_waiting_request_counts_its_bytes_until_it_is_handed_over_once() -> None:
    async def test() -> None:
        executions = Executions(Admission(1, 10, 10.0))
        big, small = execution("big", request=bytes(5000)), execution("small")
        executions.open(big)
        executions.open(small)
        assert executions.held_bytes == 5000 + len(b"request") + 2 * QUEUED_CALL_BYTES
        assert executions.hand_over(big) == bytes(5000) and big.request == b""
        assert executions.held_bytes == len(b"request") + QUEUED_CALL_BYTES
        executions.hand_over(small)
        assert executions.held_bytes == 0
    run(test)


def test_however_an_execution_ends_the_daemon_holds_none_after_no_slot_and_no_room(tmp_path: Path) -> None:
    """Answered, failed, its caller gone from the queue, cancelled in the queue, cancelled while it runs: each
    execution leaves the registry, its slot and its request's room given back."""
    directory = tmp_path / "d"
    directory.mkdir()
    gate = tmp_path / "gate"
    text = write_config(directory / "tasks.toml", 'cgroup = "off"\nmax_running = 1\n').read_text()
    with InProcessDaemon(directory, text) as d, d.client() as client, ThreadPoolExecutor(3) as pool:
        executor = d.daemon.executor
        assert client.call("echo", 5000, {"a": 1}, request_id="ends-answered").outcome
        with pytest.raises(TaskException):
            client.call("raise_now", 5000)
        running = pool.submit(client.call, "gated_progress", 30_000, {"gate": str(gate)}, request_id="ends-running")
        assert wait_until(lambda: executor.admission.running == 1, 10)
        with Client(d.unix, retry=NO_RETRY) as once:
            leaving = pool.submit(once.call, "echo", 5000, {}, request_id="ends-left", rpc_timeout=1.0)
            assert wait_until(lambda: executor.admission.queued == 1, 10)
            with pytest.raises(DeadlineExceeded):
                leaving.result(timeout=10)
        # Gone from the queue too (its caller's deadline reached the daemon), before the next call waits there.
        assert wait_until(lambda: executor.admission.queued == 0, 10)
        queued = pool.submit(client.call, "echo", 5000, {}, request_id="ends-queued")
        assert wait_until(lambda: executor.admission.queued == 1, 10)
        assert client.cancel("ends-queued") is False
        with pytest.raises(TaskCancelled):
            queued.result(timeout=10)
        assert client.cancel("ends-running") is True
        with pytest.raises(TaskCancelled):
            running.result(timeout=10)
        assert wait_until(lambda: len(executor.executions) == 0, 10), list(executor.executions)
        assert executor.admission.running == 0 and executor.executions.held_bytes == 0

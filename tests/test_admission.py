"""Fair admission over real gRPC: per-task caps, priorities, fairness keys, rates, queue timeouts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from task_runner.client import AsyncClient, Client, DeadlineExceeded, Overloaded, RpcError, TaskResult
from task_runner.client.retry import NO_RETRY
from tests.conftest import REPO, start_daemon, wait_until, write_config
from tests.inprocess import InProcessDaemon

LOG_START = "tests.tasks.faults:log_start"


@dataclass
class Gate:
    """Tasks of `log_start` log their start and end to `log`; those given the gate wait until it opens."""

    log: Path
    gate: Path

    def options(self, label: str, wait: bool = False) -> dict[str, Any]:
        return {"log": str(self.log), "label": label, **({"gate": str(self.gate)} if wait else {})}

    def open(self) -> None:
        self.gate.touch()

    def events(self) -> list[tuple[str, str, float]]:
        """(label, "start" or "end", time), in the order they were written."""
        if not self.log.exists():
            return []
        return [(label, what, float(at)) for label, what, at in
                (line.split() for line in self.log.read_text().splitlines())]

    def started(self) -> list[str]:
        return [label for label, what, _ in self.events() if what == "start"]


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "log", tmp_path / "gate")


def daemon(tmp_path: Path, settings: str, tables: str = "") -> InProcessDaemon:
    directory = tmp_path / "d"
    directory.mkdir(parents=True, exist_ok=True)
    text = write_config(directory / "tasks.toml", f'cgroup = "off"\n{settings}').read_text()
    return InProcessDaemon(directory, text + tables)


def wait_queued(d: InProcessDaemon, count: int) -> None:
    assert wait_until(lambda: d.daemon.executor.admission.queued == count, 10), d.daemon.executor.admission.queued


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[InProcessDaemon]:
    tables = f'[tasks.capped]\ntarget = "{LOG_START}"\nmax_running = 2\n'
    with daemon(tmp_path, "max_running = 6\nspare_processes = 2\n", tables) as d:
        yield d


def test_a_capped_task_never_runs_more_than_its_cap_while_others_use_the_free_slots(
        capped: InProcessDaemon, gate: Gate) -> None:
    with capped.client() as client, ThreadPoolExecutor(10) as pool:
        calls = [pool.submit(client.call, "capped", 30_000, gate.options(f"c{i}", wait=True)) for i in range(10)]
        assert wait_until(lambda: len(gate.started()) == 2, 10)
        wait_queued(capped, 8)
        admission = capped.daemon.executor.admission
        assert admission.running_by_task()["capped"] == 2 and admission.running == 2  # the others hold no slot
        assert client.call("echo", 5000, {"while": "capped wait"}).outcome  # another task type runs meanwhile
        assert client.call("log_start", 5000, gate.options("other")).outcome
        assert len([label for label in gate.started() if label.startswith("c")]) == 2
        gate.open()
        assert all(call.result(timeout=60).outcome for call in calls)
    # Over the whole run, never more than two at once: each start after the first two follows an end.
    running = peak = 0
    for label, what, _ in gate.events():
        if label.startswith("c"):
            running += 1 if what == "start" else -1
            peak = max(peak, running)
    assert peak == 2


def test_a_high_priority_call_queued_after_a_hundred_low_ones_runs_first(tmp_path: Path, gate: Gate) -> None:
    # One slot, so that calls start in the order they are admitted (two slots freed at once would let
    # two task processes race to log their start).
    with daemon(tmp_path, "max_running = 1\nmax_queued = 500\n") as d:
        async def scenario() -> None:
            async with AsyncClient(d.unix) as client:
                blockers = [asyncio.ensure_future(client.call("log_start", 30_000, gate.options("block", wait=True)))]
                await asyncio.to_thread(lambda: wait_until(lambda: len(gate.started()) == 1, 10))
                low = [asyncio.ensure_future(client.call("log_start", 30_000, gate.options("low")))
                       for _ in range(100)]
                await asyncio.to_thread(wait_queued, d, 100)
                high = asyncio.ensure_future(client.call("log_start", 30_000, gate.options("high"), priority=5))
                await asyncio.to_thread(wait_queued, d, 101)
                gate.open()
                answers = await asyncio.gather(*blockers, *low, high)
                assert all(answer.outcome for answer in answers)
        asyncio.run(scenario())
    started = gate.started()
    assert started[:2] == ["block", "high"], started[:6]


def test_a_waiting_call_rises_with_its_age_so_nothing_starves(tmp_path: Path, gate: Gate) -> None:
    with daemon(tmp_path, "max_running = 1\npriority_aging_s = 0.1\n") as d, d.client() as client, \
            ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(client.call, "log_start", 30_000, gate.options("block", wait=True))
        assert wait_until(lambda: gate.started() == ["block"], 10)
        old = pool.submit(client.call, "log_start", 30_000, gate.options("old"), priority=0)
        wait_queued(d, 1)
        time.sleep(0.6)  # what is tested is the passing of time itself: six agings, priority 0 -> 6
        new = pool.submit(client.call, "log_start", 30_000, gate.options("new"), priority=5)
        wait_queued(d, 2)
        gate.open()
        assert all(call.result(timeout=30).outcome for call in (blocker, old, new))
    assert gate.started() == ["block", "old", "new"]


def test_fairness_keys_take_turns(tmp_path: Path, gate: Gate) -> None:
    with daemon(tmp_path, "max_running = 1\nmax_queued = 500\n") as d:
        async def scenario() -> None:
            async with AsyncClient(d.unix) as client:
                blocker = asyncio.ensure_future(client.call("log_start", 30_000, gate.options("block", wait=True)))
                await asyncio.to_thread(lambda: wait_until(lambda: gate.started() == ["block"], 10))
                calls = [asyncio.ensure_future(client.call("log_start", 30_000, gate.options("A"), fairness_key="a"))
                         for _ in range(200)]
                await asyncio.to_thread(wait_queued, d, 200)
                calls += [asyncio.ensure_future(client.call("log_start", 30_000, gate.options("B"), fairness_key="b"))
                          for _ in range(2)]
                await asyncio.to_thread(wait_queued, d, 202)
                gate.open()
                assert all(answer.outcome for answer in await asyncio.gather(blocker, *calls))
        asyncio.run(scenario())
    started = gate.started()
    assert started[1:5] == ["A", "B", "A", "B"], started[:8]  # not B after all 200 of A


def test_a_rate_limit_holds_starts_to_its_bucket(tmp_path: Path, gate: Gate) -> None:
    tables = f'[tasks.limited]\ntarget = "{LOG_START}"\nrate_per_s = 20\nburst = 5\n'
    with daemon(tmp_path, "max_running = 16\n", tables) as d, d.client() as client, ThreadPoolExecutor(30) as pool:
        calls = [pool.submit(client.call, "limited", 30_000, gate.options("r")) for _ in range(30)]
        assert all(call.result(timeout=60).outcome for call in calls)
    starts = sorted(at for _, what, at in gate.events() if what == "start")
    assert len(starts) == 30
    assert starts[-1] - starts[0] >= (30 - 5) / 20 - 0.1  # it was held back: not a vacuous check
    # A start is logged a little after its admission, by a delay that varies with the machine's load (the
    # task process's hand-over): up to two tokens' worth here.
    jitter = 0.1
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            t = starts[j] - first
            assert j - i + 1 <= 5 + 20 * (t + jitter), (j - i + 1, t)


def test_a_queue_timeout_answers_deadline_exceeded_at_once_and_the_task_never_runs(
        tmp_path: Path, gate: Gate) -> None:
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.call, "log_start", 30_000, gate.options("block", wait=True))
        assert wait_until(lambda: gate.started() == ["block"], 10)
        with Client(d.unix, retry=NO_RETRY) as once:
            began = time.monotonic()
            with pytest.raises(DeadlineExceeded) as refused:
                once.call("log_start", 5000, gate.options("late"), queue_timeout_ms=200)
            waited = time.monotonic() - began
        assert refused.value.reason == "QUEUE_TIMEOUT"
        assert 0.2 <= waited < 0.25, waited
        assert d.daemon.executor.admission.queued == 0
        gate.open()
        assert blocker.result(timeout=30).outcome
        assert client.call("log_start", 5000, gate.options("after")).outcome
        registry = d.daemon.metrics.registry
        assert registry.get_sample_value("task_runner_admission_rejected_total", {"limit": "queue_timeout_ms"}) == 1
    assert "late" not in gate.started()


def test_full_queues_name_the_limit_hit_and_say_when_to_retry(tmp_path: Path, gate: Gate) -> None:
    tables = f'[tasks.narrow]\ntarget = "{LOG_START}"\nmax_running = 1\nmax_queued = 1\n'
    with daemon(tmp_path, "max_running = 2\nmax_queued = 2\n", tables) as d, d.client() as client, \
            ThreadPoolExecutor(4) as pool, Client(d.unix, retry=NO_RETRY) as once:
        running = [pool.submit(client.call, "narrow", 30_000, gate.options("n", wait=True))]
        assert wait_until(lambda: gate.started() == ["n"], 10)
        running.append(pool.submit(client.call, "narrow", 30_000, gate.options("n2")))  # waits: the cap
        wait_queued(d, 1)
        with pytest.raises(Overloaded) as task_full:
            once.call("narrow", 5000, gate.options("n3"))
        assert task_full.value.reason == "QUEUE_FULL"
        assert task_full.value.quota == ("tasks.narrow.max_queued",)
        assert task_full.value.retry_delay_s is not None and task_full.value.retry_delay_s > 0
        running.append(pool.submit(client.call, "log_start", 30_000, gate.options("x", wait=True)))  # last slot
        assert wait_until(lambda: "x" in gate.started(), 10)
        running.append(pool.submit(client.call, "log_start", 30_000, gate.options("y")))
        wait_queued(d, 2)
        with pytest.raises(Overloaded) as daemon_full:
            once.call("echo", 5000)
        assert daemon_full.value.quota == ("max_queued",)
        registry = d.daemon.metrics.registry
        for limit in ("tasks.narrow.max_queued", "max_queued"):
            assert registry.get_sample_value("task_runner_admission_rejected_total", {"limit": limit}) == 1
        assert registry.get_sample_value("task_runner_task_queued", {"task": "narrow"}) == 1
        assert registry.get_sample_value("task_runner_priority_queued", {"priority": "0"}) == 2
        gate.open()
        assert all(call.result(timeout=30).outcome for call in running)
        tasks = {task.name: task for task in client.tasks()}
    assert (tasks["narrow"].max_running, tasks["narrow"].max_queued) == (1, 1)
    assert (tasks["echo"].max_running, tasks["echo"].rate_per_s) == (0, 0.0)


def test_a_caller_leaving_the_queue_leaves_it_at_once(tmp_path: Path, gate: Gate) -> None:
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.call, "log_start", 30_000, gate.options("block", wait=True))
        assert wait_until(lambda: gate.started() == ["block"], 10)
        with Client(d.unix, retry=NO_RETRY) as once, pytest.raises(DeadlineExceeded):
            once.call("log_start", 5000, gate.options("gone"), rpc_timeout=0.3)
        assert wait_until(lambda: d.daemon.executor.admission.queued == 0, 2)
        gate.open()
        assert blocker.result(timeout=30).outcome
    assert "gone" not in gate.started()


def test_priorities_outside_the_configured_range_are_refused(tmp_path: Path) -> None:
    from task_runner.client import InvalidRequest

    with daemon(tmp_path, "min_priority = 0\nmax_priority = 3\n") as d, Client(d.unix, retry=NO_RETRY) as client:
        assert client.call("echo", 5000, priority=3).outcome
        with pytest.raises(InvalidRequest, match=r"priority 4 is outside what this daemon allows \(0 to 3\)"):
            client.call("echo", 5000, priority=4)
        with pytest.raises(InvalidRequest, match="fairness_key"):
            client.call("echo", 5000, fairness_key="a\nb")


def test_the_cli_passes_priority_fairness_key_and_queue_timeout(tmp_path: Path, gate: Gate) -> None:
    with daemon(tmp_path, "max_running = 1\n") as d, d.client() as client, ThreadPoolExecutor(1) as pool:
        def perform(*flags: str) -> tuple[int, dict[str, Any]]:
            done = subprocess.run(
                [sys.executable, "-m", "task_runner.client.cli", "perform", "log_start", "--target", d.unix,
                 "--options", json.dumps(gate.options("cli")), *flags],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )
            return done.returncode, json.loads(done.stdout)

        assert perform("--priority", "2", "--fairness-key", "tenant-1")[0] == 0
        blocker = pool.submit(client.call, "log_start", 30_000, gate.options("block", wait=True))
        assert wait_until(lambda: "block" in gate.started(), 10)
        code, out = perform("--queue-timeout", "100", "--json")
        assert code == 75 and out["error"]["status"] == "DEADLINE_EXCEEDED"  # EX_TEMPFAIL: it never ran
        assert out["error"]["reason"] == "QUEUE_TIMEOUT"
        gate.open()
        assert blocker.result(timeout=30).outcome


def test_every_accepted_call_is_answered_exactly_once_under_a_mixed_burst(tmp_path: Path) -> None:
    tables = ('[tasks.capped]\ntarget = "tests.tasks.faults:echo"\nmax_running = 2\nmax_queued = 300\n'
              '[tasks.limited]\ntarget = "tests.tasks.faults:echo"\nrate_per_s = 400\nburst = 20\n')
    d = start_daemon(tmp_path / "d", f'cgroup = "off"\nmax_running = 16\nmax_queued = 6000\n{tables}')
    try:
        async def burst() -> list[TaskResult | BaseException]:
            async with AsyncClient(d.unix, retry=NO_RETRY) as client:
                calls = []
                for i in range(5000):
                    task = ("echo", "capped", "limited")[i % 3]
                    calls.append(client.call(
                        task, 30_000, {"i": i}, request_id=f"burst-{i}", priority=i % 5 - 2,
                        fairness_key=f"k{i % 7}", queue_timeout_ms=400 if i % 10 == 0 else None,
                    ))
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(burst())
        answered = [r for r in results if isinstance(r, TaskResult)]
        refused = [r for r in results if isinstance(r, RpcError)]
        assert len(answered) + len(refused) == 5000, [r for r in results if not isinstance(r, TaskResult | RpcError)]
        assert sorted(r.result["options"]["i"] for r in answered) == sorted({r.result["options"]["i"]
                                                                            for r in answered})
        assert all(r.request_id == f"burst-{r.result['options']['i']}" for r in answered)
        for error in refused:  # only the admission limits refuse: the capped task's queue, queue timeouts
            assert (isinstance(error, Overloaded) and error.quota == ("tasks.capped.max_queued",)) or (
                isinstance(error, DeadlineExceeded) and error.reason == "QUEUE_TIMEOUT"), error
        assert len(answered) > 3000
        with Client(d.unix) as client:  # and the daemon serves on
            assert client.call("echo", 5000).outcome
    finally:
        assert d.stop() == 0, d.log_text()

"""A bounded soak: 20,000 mixed tasks, faults included; the daemon must not grow. Slow: `pytest -m slow`."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import psutil
import pytest

from task_runner.client import NO_RETRY, AsyncClient, TaskFailed
from tests.conftest import Daemon, start_daemon, wait_for_spares, wait_until
from tests.test_contract import leftovers

TOTAL = 20_000
IN_FLIGHT = 32
MIX = [  # (weight, task, options, timeout_ms)
    (80, "echo", {"n": 1}, 5000),
    (5, "reject", {}, 5000),
    (5, "raise_now", {}, 5000),
    (3, "exit_hard", {}, 5000),
    (3, "sleep", {"ms": 200}, 20),
    (2, "segfault", {}, 5000),
    (1, "set_result", {}, 5000),
    (1, "callback_twice", {}, 5000),
]
RSS_GROWTH_LIMIT = 20 << 20  # the idempotency cache alone may grow to 10,000 small answers
SPARES = 4


def is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False  # gone while we looked: reaped


def snapshot(daemon: Daemon) -> dict[str, int]:
    """The daemon's resources, once the fork server holds just its spares (each costs the daemon 3 fds)."""
    assert wait_for_spares(daemon, SPARES)
    process = psutil.Process(daemon.process.pid)
    zombies = sum(1 for p in process.children(recursive=True) if is_zombie(p))
    return {"rss": process.memory_info().rss, "threads": process.num_threads(), "fds": process.num_fds(),
            "zombies": zombies}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, f"max_running = 16\nspare_processes = {SPARES}\n")
    rng = random.Random(7)
    weights = [m[0] for m in MIX]
    try:
        async def run(count: int) -> dict[str, int]:
            outcomes: dict[str, int] = {}
            async with AsyncClient(daemon.unix, retry=NO_RETRY) as client:
                async def worker(n: int) -> None:
                    for _ in range(n):
                        _, task, options, timeout_ms = rng.choices(MIX, weights)[0]
                        try:
                            answer = await client.call(task, timeout_ms, options)
                            key = f"outcome={answer.outcome}"
                        except TaskFailed as exc:
                            key = exc.kind
                        outcomes[key] = outcomes.get(key, 0) + 1
                await asyncio.gather(*(worker(count // IN_FLIGHT) for _ in range(IN_FLIGHT)))
            return outcomes

        asyncio.run(run(1000))  # warm-up: the threads and caches that stay
        before = snapshot(daemon)
        outcomes = asyncio.run(run(TOTAL))
        assert wait_until(lambda: leftovers(daemon) == [], 10)
        after = snapshot(daemon)
        print(f"\nsoak of {TOTAL} tasks: {outcomes}\n  before {before}\n  after  {after}")
        assert sum(outcomes.values()) == TOTAL // IN_FLIGHT * IN_FLIGHT
        assert after["rss"] - before["rss"] <= RSS_GROWTH_LIMIT
        assert after["threads"] == before["threads"]
        assert after["fds"] == before["fds"]
        assert after["zombies"] == 0
    finally:
        assert daemon.stop() == 0

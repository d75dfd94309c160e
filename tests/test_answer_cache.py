"""The idempotency window (task_runner.server.answer_cache.AnswerCache, with the registry of what runs,
task_runner.server.executions): a caller's request_id finds its running execution, then its answer for the
window; answers are bounded in count and bytes, oldest out first; a cancelled one is not kept."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from task_runner.server.admission import Admission
from task_runner.server.answer_cache import AnswerCache, Kept
from task_runner.server.callers import Caller
from task_runner.server.events import EventLog
from task_runner.server.executions import Execution, Executions

WINDOW_S = 300.0
NOW = 1000.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def execution(request_id: str, caller: str = "reports", task: str = "echo") -> Execution:
    return Execution(request_id, task, Caller(caller), b"digest", b"request", NOW, EventLog(NOW), attachable=True)


class Window:
    """The registry and the answer cache as the executor uses them: a retry looks for a running execution
    first, then a kept answer; an execution's answer is kept as it settles, if a retry may still have it."""

    def __init__(self, window_s: float = WINDOW_S, max_entries: int = 10, max_bytes: int = 1 << 20) -> None:
        self.executions = Executions(Admission(1, 10, 10.0))
        self.cache = AnswerCache(window_s, max_entries, max_bytes)

    def get(self, key: tuple[str, str], now: float) -> Execution | Kept | None:
        return self.executions.attachable(key) or self.cache.get(key, now)

    def find(self, request_id: str, now: float) -> Execution | Kept | None:
        return self.executions.find_any(request_id) or self.cache.find(request_id, now)

    def add(self, running: Execution) -> None:
        self.executions.open(running)

    def finish(self, done: Execution, answer: bytes | None, now: float) -> None:
        done.answer.set_result(answer or b"")
        if answer is not None and done.attachable:
            self.cache.keep(done, answer, now)
        self.executions.settle(done)


def test_a_request_id_finds_its_running_execution_then_its_answer_until_the_window_ends() -> None:
    async def test() -> None:
        cache = Window()
        running = execution("r1")
        cache.add(running)
        assert cache.get(("reports", "r1"), NOW) is running
        cache.finish(running, b"the answer", NOW + 1)
        kept = cache.get(("reports", "r1"), NOW + 2)
        assert kept is not None and not isinstance(kept, Execution)
        assert (kept.task, kept.answer, kept.options_digest) == ("echo", b"the answer", b"digest")
        assert cache.get(("reports", "r1"), NOW + 1 + WINDOW_S - 0.001) is not None
        assert cache.get(("reports", "r1"), NOW + 1 + WINDOW_S) is None
    run(test)


def test_a_request_id_is_its_callers_own_and_found_for_anyone_only_by_a_scan() -> None:
    async def test() -> None:
        cache = Window()
        theirs = execution("shared-id", caller="billing")
        cache.add(theirs)
        assert cache.get(("reports", "shared-id"), NOW) is None
        assert cache.find("shared-id", NOW) is theirs  # for a caller who may see all
        cache.finish(theirs, b"answer", NOW)
        found = cache.find("shared-id", NOW)
        assert isinstance(found, Kept) and found.answer == b"answer"
        assert cache.find("another-id", NOW) is None
    run(test)


def test_no_answer_or_no_window_keeps_nothing() -> None:
    async def test() -> None:
        cache = Window()
        cancelled = execution("cancelled")
        cache.add(cancelled)
        cache.finish(cancelled, None, NOW)  # a CANCELLED answer: a retry should run the task
        assert cache.get(("reports", "cancelled"), NOW) is None
        windowless = Window(0.0)
        done = execution("done")
        windowless.add(done)
        windowless.finish(done, b"answer", NOW)
        assert windowless.get(("reports", "done"), NOW) is None
    run(test)


def test_a_forgotten_execution_is_not_found_and_its_answer_not_kept() -> None:
    async def test() -> None:
        cache = Window()
        left = execution("left")
        cache.add(left)
        cache.executions.forget(left)
        assert cache.get(("reports", "left"), NOW) is None
        again = execution("left")  # a retry starts afresh under the same id
        cache.add(again)
        cache.executions.forget(left)  # the old one's late forget leaves the new one be
        cache.finish(left, b"stale", NOW)
        assert cache.get(("reports", "left"), NOW) is again
    run(test)


def test_the_oldest_answers_go_first_past_the_count_or_the_bytes() -> None:
    async def test() -> None:
        counted = Window(WINDOW_S, 2, 1 << 20)
        weighed = Window(WINDOW_S, 100, 3000)
        for cache in (counted, weighed):
            for number in range(3):
                done = execution(f"r{number}")
                cache.add(done)
                cache.finish(done, bytes(1200), NOW + number)
            assert [cache.get(("reports", f"r{n}"), NOW + 3) is not None for n in range(3)] == [False, True, True]
    run(test)

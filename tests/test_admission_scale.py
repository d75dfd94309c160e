"""Admission as a unit, on a fake clock: what one decision costs with many keys waiting, and the order
it keeps (key turns, aging, per-task limits, cancellations, a drain), checked against a plain scan."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import tracemalloc
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from task_runner.server import admission as admission_module
from task_runner.server.admission import Admission, QueueFull, QueueTimeout, TaskRules

# Far beyond the event loop's own clock: the timers Admission sets on the fake clock's instants
# (a token's arrival, a queue timeout) never fire by themselves, so every decision is one the test makes.
EPOCH = 1e9


class Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


@dataclass
class Queue:
    """An Admission on a fake clock, and callers whose grants are recorded in the order they come."""

    admission: Admission
    clock: Clock
    granted: list[str] = field(default_factory=list)
    calls: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def call(self, label: str, task: str, priority: int = 0, key: str = "",
             queue_timeout_s: float | None = None) -> asyncio.Task[None]:
        async def caller() -> None:
            await self.admission.acquire(task, priority, key, queue_timeout_s)
            self.granted.append(label)

        self.calls[label] = call = asyncio.create_task(caller())
        return call

    async def settle(self) -> None:
        """Let the callers just started join the queue, and those just granted (or refused) hear of it."""
        for _ in range(3):
            await asyncio.sleep(0)  # a turn of the loop, not a wait

    async def serve(self, task: str, count: int) -> list[str]:
        """Release `count` slots of `task`, one at a time: the calls granted, in order."""
        begin = len(self.granted)
        for _ in range(count):
            self.admission.release(task)
            await self.settle()
        return self.granted[begin:]


def run(scenario: Callable[[Queue], Awaitable[None]], max_running: int = 1, max_queued: int = 100_000,
        aging_s: float = 10.0, rules: dict[str, TaskRules] | None = None) -> None:
    async def main() -> None:
        clock = Clock()
        admission = Admission(max_running, max_queued, aging_s, clock=clock)
        admission.configure(rules or {})
        queue = Queue(admission, clock)
        try:
            await scenario(queue)
        finally:
            for call in queue.calls.values():
                call.cancel()
            await asyncio.gather(*queue.calls.values(), return_exceptions=True)
    asyncio.run(main())


@pytest.fixture
def may_start_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many times a task or a caller was asked whether it may start: counted[0]."""
    counted = [0]
    original = admission_module._Share.may_start

    def counting(self: Any, now: float) -> bool:
        counted[0] += 1
        return original(self, now)

    monkeypatch.setattr(admission_module._Share, "may_start", counting)
    yield counted


# -- the cost of a decision

def test_a_decision_asks_each_task_once_however_many_keys_wait(may_start_calls: list[int]) -> None:
    waiting = 20_000

    async def scenario(q: Queue) -> None:
        q.call("running", "blocked")  # takes its one turn
        q.call("other", "other")  # and the second slot
        await q.settle()
        # Filled while every slot is held, so no decision is made while filling (the old scan would make
        # this quadratic): 20,000 calls under 20,000 keys, of a task at its max_running.
        for i in range(waiting):
            q.call(f"b{i}", "blocked", key=f"k{i}")
        await q.settle()
        assert q.admission.queued == waiting
        q.call("echo", "echo", key="late")  # an unrelated call, whose key's turn is after all of them
        await q.settle()

        may_start_calls[0] = 0
        assert await q.serve("other", 1) == ["echo"]  # one decision, and the echo call is in
        assert may_start_calls[0] <= 3, may_start_calls[0]  # each task at most once, not each key

        may_start_calls[0] = 0
        assert await q.serve("echo", 1) == []  # a slot is free, and only the blocked task's calls wait
        q.call("echo2", "echo", key="later")  # so an echo call goes at once: a decision each
        await q.settle()
        assert q.granted[-1] == "echo2"
        assert may_start_calls[0] <= 2 * 3, may_start_calls[0]

        may_start_calls[0] = 0
        assert await q.serve("blocked", 3) == ["b0", "b1", "b2"]  # the keys in turn, oldest first
        assert may_start_calls[0] <= 4 * 3, may_start_calls[0]  # a few decisions, not a scan of 20,000 keys

    run(scenario, max_running=2, rules={"blocked": TaskRules(max_running=1)})


def test_keys_served_through_another_task_cost_no_scan_either(may_start_calls: list[int]) -> None:
    # Each key has a call of a task at its cap and one of a free task: serving the free ones moves
    # every key's turn on, leaving the capped task's view of the keys stale, to be fixed lazily.
    keys = 5_000

    async def scenario(q: Queue) -> None:
        q.call("running", "capped")
        await q.settle()
        for i in range(keys):
            q.call(f"c{i}", "capped", key=f"k{i}")
            q.call(f"f{i}", "free", key=f"k{i}")
        await q.settle()
        assert q.granted == ["running", "f0"]  # then every slot is held
        may_start_calls[0] = 0
        assert await q.serve("free", keys - 1) == [f"f{i}" for i in range(1, keys)]
        # Each decision asks each task and the (one) caller once: 3, however many keys wait.
        assert may_start_calls[0] <= 3 * keys, may_start_calls[0]
        may_start_calls[0] = 0
        assert await q.serve("free", 1) == []  # a slot free, and only the capped task's calls wait
        assert may_start_calls[0] <= 3, may_start_calls[0]
        may_start_calls[0] = 0
        assert await q.serve("capped", 3) == ["c0", "c1", "c2"]  # k0 was never served, then k1, k2 in turn
        assert may_start_calls[0] <= 4 * 3, may_start_calls[0]  # a few decisions, not a scan of 5,000 keys

    run(scenario, max_running=2, rules={"capped": TaskRules(max_running=1)})


def tickets_alive() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is admission_module.Ticket)


def test_cancelled_calls_do_not_stay_in_memory() -> None:
    waiting, kept = 10_000, 1_000

    async def scenario(q: Queue) -> None:
        q.call("running", "blocked")
        await q.settle()
        for i in range(waiting):
            q.call(f"b{i}", "blocked", key=f"k{i % 100}")
        await q.settle()
        for i in range(waiting):
            if i % 10:  # nine in ten leave, from the middle of every key's queue
                q.calls.pop(f"b{i}").cancel()
        await q.settle()
        assert q.admission.queued == kept and q.admission.queued_by_task()["blocked"] == kept
        # What is left of the cancelled ones is bounded by what still waits, not by what ever waited.
        assert tickets_alive() <= 2 * kept + admission_module.COMPACT_MIN
        assert await q.serve("blocked", 3) == ["b0", "b10", "b20"]  # the survivors keep their order

    run(scenario, rules={"blocked": TaskRules(max_running=1)})


def test_keys_that_stop_waiting_are_forgotten() -> None:
    # 5,000 keys, each waiting once and served, while a blocked call waits at the same level all along.
    async def churn(q: Queue, calls: int) -> None:
        for i in range(calls):
            q.call("c", "t", key=f"key-{calls}-{i}")
            await asyncio.sleep(0)  # a turn of the loop: it waits (every slot is held)
            q.admission.release("t")
            await asyncio.sleep(0)  # and it hears it was granted
            assert q.granted == ["c"]
            q.granted.clear()
            del q.calls["c"]

    async def scenario(q: Queue) -> None:
        q.call("running", "blocked")
        q.call("stuck", "blocked", key="stuck")
        q.call("hold", "t")
        await q.settle()
        q.granted.clear()
        await churn(q, 1_000)  # warm: every structure at its working size
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await churn(q, 5_000)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 128 * 1024, grown  # a key remembered after it stopped waiting: ~0.7 MB here
        assert q.admission.queued == 1

    run(scenario, max_running=2, rules={"blocked": TaskRules(max_running=1)})


# -- the order, pinned

def test_fairness_keys_take_turns_and_a_new_key_comes_after_those_waiting() -> None:
    async def scenario(q: Queue) -> None:
        q.call("hold", "t")
        await q.settle()
        for label, key in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
            q.call(label, "t", key=key)
        await q.settle()
        assert await q.serve("t", 1) == ["a1"]
        q.call("c1", "t", key="c")  # a and b wait: c goes after both
        await q.settle()
        assert await q.serve("t", 3) == ["b1", "a2", "c1"]
        assert await q.serve("t", 1) == ["a3"]  # a alone now; then nothing waits for it
        q.call("b2", "t", key="b")  # b stopped waiting: it is a new key again,
        q.call("d1", "t", key="d")
        await q.settle()
        q.call("b3", "t", key="b")  # and keeps the turn it got on coming back
        await q.settle()
        assert await q.serve("t", 3) == ["b2", "d1", "b3"]

    run(scenario)


def test_a_key_that_stopped_waiting_and_comes_back_is_new() -> None:
    async def scenario(q: Queue) -> None:
        q.call("hold", "t")
        await q.settle()
        for label, key in (("a1", "a"), ("b1", "b"), ("b2", "b")):
            q.call(label, "t", key=key)
        await q.settle()
        assert await q.serve("t", 1) == ["a1"]  # a has nothing left waiting
        q.call("c1", "t", key="c")
        await q.settle()
        q.call("a2", "t", key="a")  # after c, which waited when a came back
        await q.settle()
        assert await q.serve("t", 4) == ["b1", "c1", "a2", "b2"]

    run(scenario)


def test_priority_with_aging_and_the_older_among_equals() -> None:
    async def scenario(q: Queue) -> None:
        q.call("hold", "t")
        await q.settle()
        q.call("old0", "t", priority=0)
        await q.settle()
        q.clock.now += 25  # old0 is worth 0 + 2 now
        q.call("fresh3", "t", priority=3)
        q.call("fresh2", "t", priority=2)
        await q.settle()
        assert await q.serve("t", 1) == ["fresh3"]
        q.clock.now += 5  # old0: 0 + 3, fresh2: 2 + 0
        assert await q.serve("t", 1) == ["old0"]
        q.call("late2", "t", priority=2)
        await q.settle()
        q.clock.now += 10  # fresh2 and late2 both 2 + 1: the older first
        assert await q.serve("t", 2) == ["fresh2", "late2"]
        assert q.admission.queued_by_priority() == {}

    run(scenario, aging_s=10.0)


def test_a_task_at_its_limits_blocks_only_its_own_calls() -> None:
    rules = {"capped": TaskRules(max_running=1), "rated": TaskRules(rate_per_s=1.0, burst=1)}

    async def scenario(q: Queue) -> None:
        q.call("cap-running", "capped")
        q.call("rate-running", "rated")  # takes the one token
        await q.settle()
        for label, task, key in (("cap1", "capped", "a"), ("rate1", "rated", "a"), ("free1", "free", "a"),
                                 ("cap2", "capped", "b"), ("free2", "free", "b")):
            q.call(label, task, key=key)
        await q.settle()
        # Key a's oldest calls may not start: its oldest that may goes, then b's turn.
        assert q.granted == ["cap-running", "rate-running", "free1", "free2"]
        assert q.admission.queued_by_task() == {"capped": 2, "rated": 1, "free": 0}
        assert q.admission.running_by_task() == {"capped": 1, "rated": 1, "free": 2}
        q.clock.now += 1.0  # a token
        assert await q.serve("free", 1) == ["rate1"]
        assert await q.serve("capped", 2) == ["cap2", "cap1"]  # b's turn: a was served last (rate1)

    run(scenario, max_running=8, rules=rules)


def test_configure_on_reload_lets_waiting_calls_go_at_once() -> None:
    async def scenario(q: Queue) -> None:
        for i in range(4):
            q.call(f"c{i}", "capped", key=f"k{i}")
        await q.settle()
        assert q.granted == ["c0"]
        q.admission.configure({"capped": TaskRules(max_running=3)})
        await q.settle()
        assert q.granted == ["c0", "c1", "c2"] and q.admission.queued == 1

    run(scenario, max_running=8, rules={"capped": TaskRules(max_running=1)})


def test_cancelled_and_timed_out_calls_are_skipped() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # The loop's own clock here, so that a queue timeout of 0 fires at the loop's next turn.
        q = Queue(Admission(1, 100, 10.0, clock=loop.time), Clock())
        q.call("hold", "t")
        await q.settle()
        q.call("gone", "t", key="a")
        q.call("late", "t", key="a", queue_timeout_s=0.0)
        q.call("a2", "t", key="a")
        q.call("b1", "t", key="b")
        left_now = q.call("left-now", "t", key="c")
        q.call("c2", "t", key="c")
        await q.settle()
        with pytest.raises(QueueTimeout):
            await q.calls.pop("late")
        q.calls.pop("gone").cancel()
        await q.settle()
        assert q.admission.queued == 4
        del q.calls["left-now"]
        left_now.cancel()  # its caller leaves, and has not yet been told, when its turn comes
        assert await q.serve("t", 3) == ["a2", "b1", "c2"]
        assert left_now.cancelled() and q.admission.queued == 0 and q.admission.running == 1
        q.admission.release("t")
        assert q.admission.running == 0
        await asyncio.wait_for(q.admission.wait_idle(), 1)
        await asyncio.gather(*q.calls.values())

    asyncio.run(main())


def test_refuse_waiting_answers_every_waiting_call_and_empties_the_queue() -> None:
    async def scenario(q: Queue) -> None:
        q.call("hold", "t")
        await q.settle()
        waiting = [q.call(f"w{i}", "t" if i % 2 else "u", priority=i % 3, key=f"k{i % 4}") for i in range(12)]
        await q.settle()
        waiting[5].cancel()
        await q.settle()
        q.admission.refuse_waiting(lambda: RuntimeError("draining"))
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[5], asyncio.CancelledError)
        assert all(isinstance(r, RuntimeError) for i, r in enumerate(results) if i != 5), results
        assert q.admission.queued == 0 and q.admission.queued_by_priority() == {}
        assert q.admission.queued_by_task() == {"t": 0, "u": 0}
        q.admission.release("t")
        await asyncio.wait_for(q.admission.wait_idle(), 1)
        q.call("after", "t", key="k0")  # and the queue works on
        await q.settle()
        assert q.granted == ["hold", "after"]

    run(scenario)


def test_full_queues_name_their_limit() -> None:
    async def scenario(q: Queue) -> None:
        q.call("hold", "t")
        q.call("n1", "narrow")
        q.call("w1", "t", key="a")
        await q.settle()
        with pytest.raises(QueueFull) as task_full:
            await q.admission.acquire("narrow", key="b")
        assert task_full.value.limit == "tasks.narrow.max_queued" and task_full.value.retry_after_s > 0
        q.call("w2", "t", key="b")
        await q.settle()
        with pytest.raises(QueueFull) as full:
            await q.admission.acquire("t", key="c")
        assert full.value.limit == "max_queued" and full.value.retry_after_s > 0
        assert q.admission.queued == 3

    run(scenario, max_queued=3, rules={"narrow": TaskRules(max_queued=1)})


# -- the order, against a plain scan of the documented rules

@dataclass
class Waiting:
    label: str
    task: str
    priority: int
    key: str
    arrived: float
    seq: int


class Reference:
    """The rules of server/admission.py's docstring, by a scan of everything waiting at each decision."""

    def __init__(self, max_running: int, aging_s: float, rules: dict[str, TaskRules], now: float) -> None:
        self.max_running, self.aging_s, self.rules = max_running, aging_s, rules
        self.running: dict[str, int] = {}
        self.tokens = {task: (float(rule.burst), now) for task, rule in rules.items() if rule.rate_per_s}
        self.waiting: list[Waiting] = []
        self.turns: dict[int, OrderedDict[str, None]] = {}  # per priority: the waiting keys, next turn first
        self.granted: list[str] = []
        self.seq = 0

    def may_start(self, task: str, now: float) -> bool:
        rule = self.rules.get(task, TaskRules())
        if rule.max_running is not None and self.running.get(task, 0) >= rule.max_running:
            return False
        if task in self.tokens:
            tokens, at = self.tokens[task]
            tokens = min(rule.burst, tokens + (now - at) * (rule.rate_per_s or 0))
            self.tokens[task] = (tokens, now)
            return tokens >= 1
        return True

    def acquire(self, label: str, task: str, priority: int, key: str, now: float) -> None:
        self.seq += 1
        self.waiting.append(Waiting(label, task, priority, key, now, self.seq))
        self.turns.setdefault(priority, OrderedDict()).setdefault(key)  # a new key: after those waiting
        self.dispatch(now)

    def remove(self, call: Waiting) -> None:
        self.waiting.remove(call)
        if not any(w.priority == call.priority and w.key == call.key for w in self.waiting):
            del self.turns[call.priority][call.key]  # nothing waits for it: it is forgotten

    def cancel(self, label: str) -> None:
        self.remove(next(w for w in self.waiting if w.label == label))

    def release(self, task: str, now: float) -> None:
        self.running[task] -= 1
        self.dispatch(now)

    def dispatch(self, now: float) -> None:
        while self.waiting and sum(self.running.values()) < self.max_running:
            offers = []
            for priority, turns in self.turns.items():
                for key in turns:  # the first key in turn with a call that may start; its oldest such call
                    calls = [w for w in self.waiting if w.priority == priority and w.key == key
                             and self.may_start(w.task, now)]
                    if calls:
                        offers.append(min(calls, key=lambda w: w.seq))
                        break
            if not offers:
                return
            call = max(offers, key=lambda w: (w.priority + math.floor((now - w.arrived) / self.aging_s),
                                              -w.arrived, -w.seq))
            self.remove(call)
            if call.key in self.turns[call.priority]:
                self.turns[call.priority].move_to_end(call.key)  # its turn is over
            self.running[call.task] = self.running.get(call.task, 0) + 1
            if call.task in self.tokens:
                tokens, at = self.tokens[call.task]
                self.tokens[call.task] = (tokens - 1, at)
            self.granted.append(call.label)


@pytest.mark.parametrize("seed", range(12))
def test_the_grant_order_is_that_of_a_plain_scan_of_the_rules(seed: int) -> None:
    rules = {"one": TaskRules(max_running=1), "two": TaskRules(max_running=2),
             "rated": TaskRules(rate_per_s=2.0, burst=2), "free": TaskRules()}
    tasks, keys = list(rules), ["", "k1", "k2", "k3", "k4"]
    aging_s, max_running = 1.0, 3
    rng = random.Random(seed)

    async def scenario(q: Queue) -> None:
        reference = Reference(max_running, aging_s, rules, q.clock.now)
        task_of: dict[str, str] = {}
        running: list[str] = []  # granted and not yet released
        for step in range(400):
            before, op = len(reference.granted), rng.random()
            if op < 0.45:
                label, task = f"c{step}", rng.choice(tasks)
                priority, key = rng.choice((0, 0, 1, 2)), rng.choice(keys)
                task_of[label] = task
                q.call(label, task, priority, key)
                reference.acquire(label, task, priority, key, q.clock.now)
            elif op < 0.75 and running:
                task = task_of[running.pop(rng.randrange(len(running)))]
                q.admission.release(task)
                reference.release(task, q.clock.now)
            elif op < 0.85 and reference.waiting:
                label = rng.choice(reference.waiting).label
                q.calls.pop(label).cancel()
                reference.cancel(label)
            else:
                q.clock.now += rng.choice((0.25, 0.5, 1.0))  # exact in binary: the buckets agree to the bit
            await q.settle()
            # The same calls granted at each step, and the same decisions in one step: a caller granted by
            # its own acquire hears of it before those its acquire granted too, hence sorted.
            assert sorted(q.granted[before:]) == sorted(reference.granted[before:]), (seed, step)
            assert q.admission.queued == len(reference.waiting)
            assert q.admission.running == sum(reference.running.values())
            running += reference.granted[before:]
        assert len(reference.granted) > 100  # not a vacuous run

    run(scenario, max_running=max_running, aging_s=aging_s, rules=rules)

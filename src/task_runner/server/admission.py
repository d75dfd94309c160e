"""Admission: which waiting call runs next, so that many callers and task types share the slots fairly.

`max_running` slots are shared by the whole daemon. A call takes one at once if one is free and
nothing waits; otherwise it waits, holding no slot, while every slot is busy, while its task (or
its caller) has its own `max_running` of it running, or while its task's (or its caller's) token
bucket (`rate_per_s`, `burst`) is empty. Whenever a slot, a turn or a token comes free, the next
call is chosen:

0. Callers take turns: the caller served least recently among those with a call that may start
   goes first (a caller new to the queue after those waiting), whatever the priorities, fairness
   keys or numbers of calls of the others: another caller's thousand calls under a thousand keys
   delay a caller's call by one start at most. Within the caller's calls:
1. Priorities: each priority level offers the call whose turn it is there (below); the level whose
   offer has the highest *effective* priority wins: the call's priority plus one for every
   `aging_s` it has waited. A low-priority call therefore overtakes fresh high-priority ones once it
   has waited long enough: nothing starves.
2. Fairness keys take turns within a level: the key served least recently goes first, so one key's
   burst of a thousand calls cannot starve another key's single call.
3. Within a key, the oldest call first (among the tasks that may start now).

A new key (one with no call waiting: a key is forgotten when its last waiting call leaves) takes
its turn after the keys already waiting. Of two calls that arrived at the same instant, the one
that came first is the older.

Each decision costs O(log n), amortized, in the calls and keys waiting (times the callers, the
priority levels and the tasks that have calls waiting, all bounded by the config), never a scan of
the keys: see
`_Level` and `_Lane`. Cancelled and timed-out calls are dropped lazily, and never outnumber the
live ones for long (`COMPACT_MIN`).

The slot counts these choices are made on (`running`, in all, per task and per caller) and the idle event a
drain waits on are here too; which executions hold the slots is the registry's (task_runner.server.executions),
which gives each slot back (`release`) once its process is reaped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

HOLD_EWMA = 0.1  # the weight of the newest slot hold time in the queue's pace
MIN_RETRY_S, MAX_RETRY_S = 0.05, 60.0
COMPACT_MIN = 64  # a lane is compacted once its dead tickets outnumber its live ones and are at least this many


class QueueFull(Exception):
    """The call may not wait: a queue is full. `limit` names it ("max_queued", "tasks.NAME.max_queued",
    "callers.NAME.max_queued")."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit, self.retry_after_s = limit, retry_after_s


class QueueTimeout(Exception):
    """The call waited its whole queue_timeout_ms and never ran."""


@dataclass(frozen=True)
class TaskRules:
    """A task's (or a caller's) own admission limits; None: none."""

    max_running: int | None = None
    max_queued: int | None = None
    rate_per_s: float | None = None
    burst: int = 1  # the starts a full bucket allows at once


class _Bucket:
    """A token bucket: `burst` tokens at most, refilled at `rate` a second; a start takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self._at = float(burst), now

    def refill(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        return self.tokens

    def ready_at(self, now: float) -> float:
        """When a token is there (now, if one is)."""
        tokens = self.refill(now)
        return now if tokens >= 1 else now + (1 - tokens) / self.rate


@dataclass(eq=False)
class _Share:
    """A task's or a caller's admission state, kept by name across reloads."""

    rules: TaskRules
    bucket: _Bucket | None
    running: int = 0
    queued: int = 0

    def may_start(self, now: float) -> bool:
        if self.rules.max_running is not None and self.running >= self.rules.max_running:
            return False
        return self.bucket is None or self.bucket.refill(now) >= 1


@dataclass(eq=False, slots=True)
class Ticket:
    """One call waiting for a slot."""

    task: str
    caller: str
    priority: int
    key: str
    arrived: float
    future: asyncio.Future[None]
    live: bool = True
    timer: asyncio.TimerHandle | None = None
    seq: int = 0  # arrival order: the older of two calls that arrived at the same instant


@dataclass(eq=False, slots=True)
class _Lane:
    """One task's calls waiting at one priority level: a FIFO per fairness key, and a heap of those keys
    by turn stamp, so the key whose turn it is among this task's calls is at the top.

    Every key in `fifos` has exactly one entry in `heap`; an entry is stale when its key's stamp moved
    on since (its turn was served through another task's call), and is fixed when it reaches the top.
    A cancelled or timed-out ticket stays in its FIFO, dead, until it reaches the front or the lane
    is compacted.
    """

    heap: list[tuple[int, str]] = field(default_factory=list)
    fifos: dict[str, collections.deque[Ticket]] = field(default_factory=dict)
    live: int = 0  # tickets still waiting
    dead: int = 0  # tickets out of the queue but still in a FIFO


@dataclass(eq=False, slots=True)
class _Level:
    """The calls waiting at one priority: each waiting key's turn stamp, and a lane per task.

    A key is stamped from a counter that only grows when it starts waiting and again each time it
    is served, so the smallest stamp is the key served least recently (or waiting longest unserved),
    and a new key comes after every key already waiting.
    """

    stamps: dict[str, int] = field(default_factory=dict)  # the keys with calls waiting
    waiting: dict[str, int] = field(default_factory=dict)  # key: its calls waiting, of every task
    lanes: dict[str, _Lane] = field(default_factory=dict)  # task: its calls waiting
    count: int = 0
    next_stamp: int = 0

    def stamp(self, key: str) -> None:
        """`key` takes its turn after every key waiting now."""
        self.stamps[key] = self.next_stamp
        self.next_stamp += 1

    def top(self, lane: _Lane) -> tuple[str, Ticket] | None:
        """The lane's key whose turn it is and its oldest live ticket; stale entries and dead tickets
        met on the way are fixed or dropped (each once, so this is O(log n) amortized)."""
        heap = lane.heap
        while heap:
            stamp, key = heap[0]
            fifo = lane.fifos[key]
            while fifo and not fifo[0].live:
                fifo.popleft()
                lane.dead -= 1
            if not fifo:
                heapq.heappop(heap)
                del lane.fifos[key]
            elif stamp != self.stamps[key]:  # a live ticket waits: the key is stamped
                heapq.heapreplace(heap, (self.stamps[key], key))
            else:
                return key, fifo[0]
        return None

    def compact(self, lane: _Lane) -> None:
        """Drop the lane's dead tickets, so that many cancelled calls do not keep it large."""
        fifos = {key: live for key, fifo in lane.fifos.items()
                 if (live := collections.deque(ticket for ticket in fifo if ticket.live))}
        lane.fifos = fifos
        lane.heap = [(self.stamps[key], key) for key in fifos]
        heapq.heapify(lane.heap)
        lane.dead = 0


@dataclass(eq=False, slots=True)
class _Queue:
    """One caller's waiting calls: a level per priority."""

    levels: dict[int, _Level] = field(default_factory=dict)
    count: int = 0


class Admission:
    """The slots, the queue in front of them and the order it is served in.

    Args:
        max_running: slots, daemon-wide.
        max_queued: calls that may wait, daemon-wide.
        aging_s: a waiting call's priority rises by one for each `aging_s` it has waited.
        clock: the monotonic clock (the event loop's).
    """

    def __init__(self, max_running: int, max_queued: int, aging_s: float,
                 clock: Callable[[], float] | None = None) -> None:
        self.max_running, self.max_queued, self.aging_s = max_running, max_queued, aging_s
        self._clock = clock or asyncio.get_running_loop().time
        self.running = 0
        self.queued = 0
        self._tasks: dict[str, _Share] = {}
        self._callers: dict[str, _Share] = {}
        self._queues: dict[str, _Queue] = {}  # by caller: the callers with calls waiting
        self._turns: dict[str, int] = {}  # their turn stamps: the smallest was served least recently
        self._next_turn = 0
        self._hold_s = 0.0  # the pace of the queue: a moving average of how long a slot is held
        self._seq = 0  # tickets issued
        self._wake: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def configure(self, rules: Mapping[str, TaskRules], callers: Mapping[str, TaskRules] | None = None) -> None:
        """Take the tasks' and the callers' limits (at start and at each reload); what runs and waits stays
        counted."""
        now = self._clock()
        for shares, given in ((self._tasks, rules), (self._callers, callers or {})):
            for name, rule in given.items():
                state = shares.get(name)
                bucket = _Bucket(rule.rate_per_s, rule.burst, now) if rule.rate_per_s else None
                if state is None:
                    shares[name] = _Share(rule, bucket)
                elif state.rules != rule:
                    state.rules, state.bucket = rule, bucket
            for name in [n for n, s in shares.items() if n not in given and not s.running and not s.queued]:
                del shares[name]
            for name, state in shares.items():
                if name not in given and state.rules != TaskRules():  # gone from the config: no limit of its own
                    state.rules, state.bucket = TaskRules(), None
        self._dispatch()

    # Read by the metrics' thread too: list() copies a dict's items without letting the loop in.
    def running_by_task(self) -> dict[str, int]:
        return {name: state.running for name, state in list(self._tasks.items())}

    def queued_by_task(self) -> dict[str, int]:
        return {name: state.queued for name, state in list(self._tasks.items())}

    def queued_by_priority(self) -> dict[int, int]:
        counts: dict[int, int] = collections.Counter()
        for queue in list(self._queues.values()):
            for priority, level in list(queue.levels.items()):
                counts[priority] += level.count
        return {priority: count for priority, count in counts.items() if count}

    async def acquire(self, task: str, priority: int = 0, key: str = "", queue_timeout_s: float | None = None,
                      on_wait: Callable[[int], None] | None = None, *, caller: str = "") -> None:
        """Take a slot for a call of `task` by `caller`, waiting in the queue if need be (`on_wait` is told,
        with the count of calls waiting before it, when it joins the queue).

        Raises:
            QueueFull: at once, if the daemon's queue, the task's own or the caller's own is full.
            QueueTimeout: if it waited `queue_timeout_s` without a slot (it is out of the queue then).
        """
        state, share = self._share(self._tasks, task), self._share(self._callers, caller)
        now = self._clock()
        if not self.queued and self.running < self.max_running and state.may_start(now) and share.may_start(now):
            self._take(state, share)
            return
        if self.queued >= self.max_queued:
            raise QueueFull("max_queued", f"queue full: {self.running} tasks running and {self.queued} queued "
                            "(max_queued); retry later", self._pace(self.queued, self.max_running))
        for scope, name, limited in (("tasks", task, state), ("callers", caller, share)):
            if limited.rules.max_queued is not None and limited.queued >= limited.rules.max_queued:
                what = "task" if scope == "tasks" else "caller"
                raise QueueFull(
                    f"{scope}.{name}.max_queued",
                    f"queue full for {what} {name!r}: {limited.queued} of its calls wait ({scope}.{name}.max_queued = "
                    f"{limited.rules.max_queued}); retry later", self._share_pace(limited, now),
                )
        loop = asyncio.get_running_loop()
        self._seq += 1
        ticket = Ticket(task, caller, priority, key, now, loop.create_future(), seq=self._seq)
        if on_wait is not None:
            on_wait(self.queued)
        self._enqueue(ticket, state, share)
        if queue_timeout_s is not None:
            ticket.timer = loop.call_at(now + queue_timeout_s, self._expire, ticket, queue_timeout_s)
        self._dispatch()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
                self.release(task, caller=caller)  # the slot was handed over just as the caller left: pass it on
            else:
                self._leave(ticket)
            raise
        finally:
            if ticket.timer is not None:
                ticket.timer.cancel()

    def release(self, task: str, held_s: float | None = None, *, caller: str = "") -> None:
        """Give a slot back (`held_s`: how long it was held, for the queue's pace); the next call takes it."""
        if held_s is not None:
            self._hold_s = held_s if not self._hold_s else self._hold_s + HOLD_EWMA * (held_s - self._hold_s)
        self._tasks[task].running -= 1
        self._callers[caller].running -= 1
        self.running -= 1
        self._dispatch()
        if self.running == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no slot is held."""
        await self._idle.wait()

    def refuse_waiting(self, make_error: Callable[[], BaseException]) -> None:
        """Answer every waiting call with an error (a drain's end): the queue is empty after this."""
        refused = [ticket for queue in self._queues.values() for level in queue.levels.values()
                   for lane in level.lanes.values() for fifo in lane.fifos.values() for ticket in fifo if ticket.live]
        self._queues.clear()
        self._turns.clear()
        for ticket in refused:
            ticket.live = False
            self.queued -= 1
            self._tasks[ticket.task].queued -= 1
            self._callers[ticket.caller].queued -= 1
            if not ticket.future.done():
                ticket.future.set_exception(make_error())

    # -- inside

    @staticmethod
    def _share(shares: dict[str, _Share], name: str) -> _Share:
        state = shares.get(name)
        if state is None:  # a task or caller with no rules of its own (or not configured yet)
            state = shares[name] = _Share(TaskRules(), None)
        return state

    def _take(self, state: _Share, share: _Share) -> None:
        for limited in (state, share):
            limited.running += 1
            if limited.bucket is not None:
                limited.bucket.tokens -= 1
        self.running += 1
        self._idle.clear()

    def _enqueue(self, ticket: Ticket, state: _Share, share: _Share) -> None:
        queue = self._queues.get(ticket.caller)
        if queue is None:
            queue = self._queues[ticket.caller] = _Queue()
            self._stamp(ticket.caller)  # a caller new to the queue takes its turn after those waiting
        level = queue.levels.get(ticket.priority)
        if level is None:
            level = queue.levels[ticket.priority] = _Level()
        waiting = level.waiting.get(ticket.key, 0)
        if not waiting:
            level.stamp(ticket.key)  # a new key takes its turn after those waiting
        level.waiting[ticket.key] = waiting + 1
        lane = level.lanes.get(ticket.task)
        if lane is None:
            lane = level.lanes[ticket.task] = _Lane()
        fifo = lane.fifos.get(ticket.key)
        if fifo is None:
            fifo = lane.fifos[ticket.key] = collections.deque()
            heapq.heappush(lane.heap, (level.stamps[ticket.key], ticket.key))
        fifo.append(ticket)
        lane.live += 1
        level.count += 1
        queue.count += 1
        state.queued += 1
        share.queued += 1
        self.queued += 1

    def _stamp(self, caller: str) -> None:
        self._turns[caller] = self._next_turn
        self._next_turn += 1

    def _leave(self, ticket: Ticket) -> None:
        """Out of the queue (cancelled, timed out): counted out now, removed from its FIFO lazily."""
        if not ticket.live:
            return
        level, lane = self._count_out(ticket)
        if lane.live:
            lane.dead += 1
            if lane.dead > lane.live and lane.dead >= COMPACT_MIN:
                level.compact(lane)

    def _count_out(self, ticket: Ticket) -> tuple[_Level, _Lane]:
        """The ticket no longer waits; a key, lane, level or caller's queue left with nothing waiting is
        dropped (a key or caller that waits again is new)."""
        ticket.live = False
        self.queued -= 1
        self._tasks[ticket.task].queued -= 1
        self._callers[ticket.caller].queued -= 1
        queue = self._queues[ticket.caller]
        level = queue.levels[ticket.priority]
        level.count -= 1
        waiting = level.waiting[ticket.key] - 1
        if waiting:
            level.waiting[ticket.key] = waiting
        else:
            del level.waiting[ticket.key], level.stamps[ticket.key]
        lane = level.lanes[ticket.task]
        lane.live -= 1
        if not lane.live:  # only dead tickets are left in it
            del level.lanes[ticket.task]
        if not level.count:
            del queue.levels[ticket.priority]
        queue.count -= 1
        if not queue.count:
            del self._queues[ticket.caller], self._turns[ticket.caller]
        return level, lane

    def _expire(self, ticket: Ticket, waited_s: float) -> None:
        if ticket.live and not ticket.future.done():
            self._leave(ticket)
            ticket.future.set_exception(QueueTimeout(
                f"the call waited {waited_s * 1e3:.0f} ms for a slot (queue_timeout_ms) and never ran",
            ))

    def _offer(self, level: _Level, startable: dict[str, bool], now: float) -> tuple[_Lane, str, Ticket] | None:
        """The call whose turn it is at this level: the least recently served key with a call of a task
        that may start now, and its oldest such call. One heap top per task, not a scan of the keys
        (`startable` keeps each task's answer for the whole decision)."""
        best: tuple[int, int, _Lane, str, Ticket] | None = None
        for task, lane in level.lanes.items():
            may_start = startable.get(task)
            if may_start is None:
                may_start = startable[task] = self._tasks[task].may_start(now)
            if not may_start:
                continue
            top = level.top(lane)
            if top is None:
                continue
            key, ticket = top
            candidate = (level.stamps[key], ticket.seq, lane, key, ticket)
            if best is None or candidate[:2] < best[:2]:  # the key's turn first, then its oldest call
                best = candidate
        return None if best is None else best[2:]

    def _choose(self, queue: _Queue, startable: dict[str, bool], now: float,
                ) -> tuple[_Level, _Lane, str, Ticket] | None:
        """Of one caller's waiting calls, the one to start: the highest effective priority; the older among
        equals."""
        chosen: tuple[tuple[int, float, int], _Level, _Lane, str, Ticket] | None = None
        for priority, level in queue.levels.items():
            offer = self._offer(level, startable, now)
            if offer is None:
                continue
            lane, key, ticket = offer
            rank = (priority + math.floor((now - ticket.arrived) / self.aging_s), -ticket.arrived, -ticket.seq)
            if chosen is None or rank > chosen[0]:
                chosen = (rank, level, lane, key, ticket)
        return None if chosen is None else chosen[1:]

    def _next(self, now: float) -> tuple[_Level, _Lane, str, Ticket] | None:
        """The call to start: of the caller served least recently that has one that may start."""
        startable: dict[str, bool] = {}  # each task asked once per decision, however many keys wait
        for caller in sorted(self._turns, key=self._turns.__getitem__):
            if not self._callers[caller].may_start(now):
                continue
            chosen = self._choose(self._queues[caller], startable, now)
            if chosen is not None:
                return chosen
        return None

    def _dispatch(self) -> None:
        """Hand free slots to the calls whose turn it is."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        now = self._clock()
        while self.queued and self.running < self.max_running:
            chosen = self._next(now)
            if chosen is None:
                self._wake_for_tokens(now)
                return
            level, lane, key, ticket = chosen
            fifo = lane.fifos[key]
            fifo.popleft()  # the ticket: the top of its lane
            self._count_out(ticket)
            granted = not ticket.future.done()  # done: its caller left this very moment (not yet told)
            if granted and key in level.stamps:
                level.stamp(key)  # its turn is over: every other key waiting goes before it again
            if granted and ticket.caller in self._turns:
                self._stamp(ticket.caller)  # and every other caller waiting before this one
            if lane.live:  # the lane's top entry is this key's: fix it now rather than lazily
                if not fifo:
                    heapq.heappop(lane.heap)
                    del lane.fifos[key]
                elif key in level.stamps:
                    heapq.heapreplace(lane.heap, (level.stamps[key], key))
            if granted:
                self._take(self._tasks[ticket.task], self._callers[ticket.caller])
                ticket.future.set_result(None)

    def _wake_for_tokens(self, now: float) -> None:
        """Calls wait only for tokens: dispatch again when the first comes."""
        times = [state.bucket.ready_at(now) for shares in (self._tasks, self._callers) for state in shares.values()
                 if state.queued and state.bucket is not None and state.bucket.refill(now) < 1
                 and (state.rules.max_running is None or state.running < state.rules.max_running)]
        if times:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._wake = asyncio.get_running_loop().call_at(min(times), self._dispatch)

    def _pace(self, ahead: int, slots: int) -> float:
        """A retry delay from the queue's pace: the time for `ahead` calls to go through `slots`."""
        if not self._hold_s:
            return 0.1
        return min(MAX_RETRY_S, max(MIN_RETRY_S, self._hold_s * (ahead + 1) / max(1, slots)))

    def _share_pace(self, state: _Share, now: float) -> float:
        if state.bucket is not None:  # its rate sets the pace: the time for the tokens its queue needs
            need = state.queued + 1 - state.bucket.refill(now)
            return min(MAX_RETRY_S, max(MIN_RETRY_S, need / state.bucket.rate))
        return self._pace(state.queued, state.rules.max_running or self.max_running)

"""The one registry of live executions: every execution the daemon holds, from the call that opens it until it is
answered and its task process is reaped.

    open -> admitted (a slot) -> started (a Run) -> settled (answered) -> reaped -> gone

Watch, Cancel and a retry under a request_id find an execution here while it is unanswered; the drain and a
reload ask it what runs; the byte room of waiting calls is counted here. Admission keeps its queue and the slot
counts its choices are made on, and is told here when an execution's slot comes free: once its process is
reaped, or as it settles if it took none. A finished answer is the answer cache's (task_runner.server.answer_cache).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from task_runner.server.admission import Admission
from task_runner.server.callers import Caller
from task_runner.server.events import EventLog
from task_runner.server.run import Run
from task_runner.server.wire import Stop

if TYPE_CHECKING:
    from task_runner.server.execution import Generation

# What a call waiting for a task process costs the daemon besides its request's bytes (its
# execution, event log and asyncio tasks, gRPC's call and stream): 24-26 KiB of RSS measured per
# queued call, rounded up. max_queued_bytes counts it for each, so that tiny calls fill it too.
QUEUED_CALL_BYTES = 32 << 10

Key = tuple[str, str]  # a caller's name and a request_id: a request_id is the caller's own


class Ended(NamedTuple):
    """How an execution ended, for the access log: the task's outcome ("true", "false") or error kind
    ("" for neither: it was refused or lost), and the time it waited for a slot and ran."""

    outcome: str = ""
    error: str = ""
    queue_ms: float = 0.0
    run_ms: float = 0.0


NOT_ENDED = Ended()


@dataclass(eq=False)
class Execution:
    """One run of a task. Every call with the same request_id attaches to it and gets its answer."""

    request_id: str
    task: str
    caller: Caller  # whose it is: its request_id is looked up among that caller's alone
    options_digest: bytes  # of its options as they came, to tell a different request under the same request_id
    request: bytes  # the raw request, until it is handed to the task process
    received_at: float
    events: EventLog
    # A retry under its request_id attaches to it: the caller gave the id, and a caller still waits for it.
    attachable: bool = False
    admitted_at: float | None = None  # loop time it took a slot (None: it never did)
    holds_slot: bool = False  # from admission until its process is reaped (or it settles without one)
    run: Run | None = None
    generation: Generation | None = None  # the one its run is in
    job: asyncio.Future[None] | None = None  # admission, then the run: independent of any one caller
    answer: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attached: int = 0
    cancelled: bool = False  # a Cancel asked for it: the answer is CANCELLED even if it never ran
    ended: Ended = NOT_ENDED  # how it ended, once it has

    @property
    def key(self) -> Key:
        return self.caller.name, self.request_id

    def abandon(self) -> None:
        """Every caller left before the answer: kill the run, or leave the queue."""
        if self.run is not None:
            self.run.stop(Stop.CANCELLED)  # the slot is freed once the process is reaped
        elif self.job is not None:
            self.job.cancel()


class Executions:
    """Every live execution: the only record in the daemon of what waits and runs now.

    An execution is held (and with it its job, which asyncio alone would not keep) until it is settled and
    its process, if it took one, is reaped. Of those, the unanswered are found by caller and request_id: the
    newest under each, since a retry after every caller left starts afresh while the old one is still killed.

    Args:
        admission: told when an execution's slot comes free.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._live: dict[Execution, None] = {}  # in the order they came
        self._unanswered: dict[Key, Execution] = {}
        self.held_bytes = 0  # of requests not yet handed to a task process, and QUEUED_CALL_BYTES for each

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Execution]:
        return iter(list(self._live))

    def open(self, execution: Execution) -> None:
        """Hold a new execution: findable at once (a duplicate arriving now attaches to it), its request counted
        as waiting."""
        self._live[execution] = None
        self._unanswered[execution.key] = execution
        self.held_bytes += len(execution.request) + QUEUED_CALL_BYTES

    def find(self, key: Key) -> Execution | None:
        """The unanswered execution of a caller's request_id, if one runs or waits."""
        return self._unanswered.get(key)

    def find_any(self, request_id: str) -> Execution | None:
        """The unanswered execution of `request_id` of any caller (for a caller who may see all): a scan."""
        return next((found for (_, rid), found in self._unanswered.items() if rid == request_id), None)

    def attachable(self, key: Key) -> Execution | None:
        """The execution a retry under a caller's request_id attaches to, if one runs or waits."""
        found = self._unanswered.get(key)
        return found if found is not None and found.attachable else None

    @staticmethod
    def forget(execution: Execution) -> None:
        """No caller waits for `execution` any more: a retry must start afresh (Watch and Cancel still find it)."""
        execution.attachable = False

    def hand_over(self, execution: Execution) -> bytes:
        """The request's bytes, handed to the task process (or given up): they, and the call, no longer count as
        waiting. Called once for each execution: a request is never empty (it names its task)."""
        request, execution.request = execution.request, b""
        self.held_bytes -= len(request) + QUEUED_CALL_BYTES
        return request

    @staticmethod
    def admitted(execution: Execution, at: float) -> None:
        """`execution` took a slot at loop time `at`: it holds it until its process is reaped."""
        execution.admitted_at, execution.holds_slot = at, True

    def started(self, execution: Execution, run: Run, generation: Generation) -> None:
        """`execution` runs in `run`, a process of `generation`: its slot comes free once that is reaped."""
        execution.run, execution.generation = run, generation
        run.reaped.add_done_callback(lambda _: self._reaped(execution))

    def settle(self, execution: Execution) -> None:
        """`execution` is answered (or refused, or given up): out of reach of Watch, Cancel and retries; its slot
        comes free now if no process holds it, and it is gone once none does."""
        if self._unanswered.get(execution.key) is execution:  # not a later one under the same id
            del self._unanswered[execution.key]
        if execution.run is None:
            self._free_slot(execution)
        if not execution.holds_slot:
            self._live.pop(execution, None)

    def runs(self, generation: Generation | None = None) -> list[Run]:
        """The runs whose process is not yet reaped (of `generation` alone, if given)."""
        return [execution.run for execution in self._live if execution.run is not None
                and not execution.run.reaped.done() and (generation is None or execution.generation is generation)]

    def _reaped(self, execution: Execution) -> None:
        """Its process is gone: its slot is free, and it is gone too if it was answered."""
        self._free_slot(execution)
        if execution.answer.done():
            self._live.pop(execution, None)

    def _free_slot(self, execution: Execution) -> None:
        if not execution.holds_slot:
            return
        execution.holds_slot = False
        assert execution.admitted_at is not None
        held_s = asyncio.get_running_loop().time() - execution.admitted_at if execution.run is not None else None
        self._admission.release(execution.task, held_s, caller=execution.caller.name)

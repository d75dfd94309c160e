"""An execution's life, in one place: admission, a spare task process, the run, the answer, the release.

    Executor.perform: the registry, then the answer cache (a retry attaches to its request_id's execution)
        -> admit (a slot, or a place in the queue) -> take a spare process of the current generation
        -> assign -> run -> answer every caller attached -> settle, once -> the slot back once the
        process is reaped

The servicer (task_runner.server.service) decodes and validates a request and maps a `Refusal`
to a gRPC status; everything after that is here. What waits and runs now is the registry's
(task_runner.server.executions); a reload swaps the whole `Generation` new calls are served with.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from task_runner import frames
from task_runner.frames import error_response
from task_runner.server import logs, wire
from task_runner.server.admission import Admission, QueueFull, QueueTimeout
from task_runner.server.answer_cache import AnswerCache, Kept
from task_runner.server.callers import Caller, Callers
from task_runner.server.config import MIB, Config, Task
from task_runner.server.events import EventLog
from task_runner.server.executions import NOT_ENDED, QUEUED_CALL_BYTES, Ended, Execution, Executions
from task_runner.server.forkclient import FORK_RETRY_S, ForkServerClient, ForkServerDied, NoProcess
from task_runner.server.metrics import Metrics
from task_runner.server.run import Run
from task_runner.server.sandbox import cgroups
from task_runner.server.tracing import CallSpans, TraceContext, Tracer
from task_runner.server.wire import Stop
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformRequest, PerformResponse, TaskError
from task_runner.values import struct_digest

log = logging.getLogger("task_runner.server")
QUEUE_RETRY_S = 0.1  # the retry delay a full queue suggests


class Reason(enum.Enum):
    """Why a call is refused: the one table of refusals. Each reason holds the gRPC status it is answered with
    and whether it is public: named to the caller as google.rpc.ErrorInfo's reason (its `error_reason`, beside
    any retry hints), for a caller to act on; a private one travels as its status and message alone. The
    .proto's table of refusals lists these rows (tests/test_refusals.py holds the two to each other)."""

    # name = ErrorInfo reason, gRPC status, public
    # A request the servicer (task_runner.server.service) refuses as it reads it.
    UNAUTHENTICATED = "UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, False
    MALFORMED_REQUEST = "MALFORMED_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, False
    TASK_NAME_REQUIRED = "TASK_NAME_REQUIRED", grpc.StatusCode.INVALID_ARGUMENT, False
    UNKNOWN_TASK = "UNKNOWN_TASK", grpc.StatusCode.NOT_FOUND, False  # or no longer served, once admitted
    TASK_NOT_PERMITTED = "TASK_NOT_PERMITTED", grpc.StatusCode.PERMISSION_DENIED, True
    TIMEOUT_ABOVE_MAXIMUM = "TIMEOUT_ABOVE_MAXIMUM", grpc.StatusCode.INVALID_ARGUMENT, False
    REQUEST_ID_TOO_LONG = "REQUEST_ID_TOO_LONG", grpc.StatusCode.INVALID_ARGUMENT, False
    REQUEST_ID_NOT_PRINTABLE = "REQUEST_ID_NOT_PRINTABLE", grpc.StatusCode.INVALID_ARGUMENT, False
    PRIORITY_OUT_OF_RANGE = "PRIORITY_OUT_OF_RANGE", grpc.StatusCode.INVALID_ARGUMENT, False
    FAIRNESS_KEY_INVALID = "FAIRNESS_KEY_INVALID", grpc.StatusCode.INVALID_ARGUMENT, False
    REQUEST_ID_HEADER_INVALID = "REQUEST_ID_HEADER_INVALID", grpc.StatusCode.INVALID_ARGUMENT, False
    REQUEST_IDS_DIFFER = "REQUEST_IDS_DIFFER", grpc.StatusCode.INVALID_ARGUMENT, False
    # A call the executor does not run (or could not finish running).
    QUEUE_FULL = "QUEUE_FULL", grpc.StatusCode.RESOURCE_EXHAUSTED, True
    QUEUE_BYTES_FULL = "QUEUE_BYTES_FULL", grpc.StatusCode.RESOURCE_EXHAUSTED, True
    SHUTTING_DOWN = "SHUTTING_DOWN", grpc.StatusCode.UNAVAILABLE, True
    NO_TASK_PROCESS = "NO_TASK_PROCESS", grpc.StatusCode.UNAVAILABLE, True
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, True
    NO_SUCH_EXECUTION = "NO_SUCH_EXECUTION", grpc.StatusCode.NOT_FOUND, False
    INVALID_OPTIONS = "INVALID_OPTIONS", grpc.StatusCode.INVALID_ARGUMENT, False
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED", grpc.StatusCode.INVALID_ARGUMENT, False
    INTERNAL = "INTERNAL", grpc.StatusCode.INTERNAL, False

    error_reason: str
    code: grpc.StatusCode
    public: bool

    def __init__(self, error_reason: str, code: grpc.StatusCode, public: bool) -> None:
        self.error_reason, self.code, self.public = error_reason, code, public


class Refusal(Exception):
    """A call the daemon does not run (or could not finish running). `retry_after_s` is set when a
    retry may cure it, and says how soon; `quota` names the limit hit, if one was."""

    def __init__(self, reason: Reason, message: str, retry_after_s: float | None = None, quota: str = "") -> None:
        super().__init__(message)
        self.reason, self.retry_after_s, self.quota = reason, retry_after_s, quota


class Wants(NamedTuple):
    """What a call asks of admission."""

    priority: int = 0
    fairness_key: str = ""
    queue_timeout_s: float | None = None  # None: it may wait as long as its RPC does
    grace_s: float | None = None  # its notice before the deadline; None: the task's own grace_ms


@dataclass(slots=True, eq=False)
class Call:
    """A validated Perform or PerformStream request: all the executor takes of it (one field per thing a
    request brings, so that a new one is added here and where it is read, nowhere between)."""

    request: bytes  # serialized, sent to the task process as it came; taken by the execution it opens
    task: Task  # the task it names, in the generation current when it came
    caller: Caller
    request_id: str  # the caller's, or "" (then it is neither looked up nor kept)
    digest: bytes  # options_digest of its options as they came (empty without a request_id)
    timeout_ms: int  # the task's time to run, from hand-over
    rpc_deadline: float  # loop time by which the answer must be on its way (inf: none)
    received_at: float  # loop time it arrived
    wants: Wants = field(default_factory=Wants)
    trace: TraceContext | None = None  # the caller's W3C trace context, if the call carried one


class Performed(NamedTuple):
    """What a call came to, as `Executor.perform` returns it: the execution it opened or joined ("" if it opened
    none), whether that was another call's (a repeat of its request_id), how that ended; and its serialized
    answer (a stream's went as its last event), or the refusal it got."""

    execution_id: str = ""
    shared: bool = False
    ended: Ended = NOT_ENDED
    answer: bytes = b""
    refusal: Refusal | None = None


Opened = Callable[[str, bool], None]  # told an execution's id, and whether it was another call's, once opened


class _Settled(NamedTuple):
    """What an execution's phases came to, settled in one place (`Executor._settle`)."""

    response: PerformResponse | None = None  # every caller's answer (the task's, or the daemon's own), if any
    refusal: Refusal | None = None  # else the refusal every caller gets; neither: every caller left
    returned: bool = False  # its run returned: its process ends by itself (else it is killed, if it has one)

    @property
    def refused_by_runner(self) -> bool:
        """The run returned a refusal: the runner's verdict on the options, before any task code ran."""
        return self.returned and self.refusal is not None


class _Handover(NamedTuple):
    """What the task process is handed besides the request: the assignment's head, its deadline and heartbeat
    timeout."""

    head: bytes
    deadline: float
    stall_s: float | None


def _import_failed(task: str, import_error: str) -> PerformResponse:
    """The daemon's answer for a task that failed to import: its exception's line, and the traceback."""
    last = import_error.strip().splitlines()[-1] if import_error.strip() else "ImportError"
    type_, _, message = last.partition(": ")
    return error_response(TaskError.IMPORT_FAILED, type_, f"task {task!r} could not be imported: "
                          f"{message or type_}; fix it and reload the daemon", import_error)


def _failure_line(error: TaskError) -> str:
    how = f"exit code {error.exit_code}" if error.exit_code else f"signal {error.signal}" if error.signal else ""
    what = f"{error.type}: {error.message}" if error.type else error.message
    return ", ".join(part for part in (TaskError.Kind.Name(error.kind), what, how) if part)


def _failure(task: str, response: PerformResponse) -> dict[str, object]:
    """The fields of a failed task's log record (task_runner.server.logs.FAILURE_FIELDS), bounded."""
    error = response.error
    return {
        "task": task, "kind": TaskError.Kind.Name(error.kind), "error_type": error.type,
        "error_message": error.message[:1000], "exit_code": error.exit_code or None,
        "signal": error.signal or None, "limit": error.limit,
        "traceback": logs.tail_lines(error.traceback, logs.TRACEBACK_MAX),
        "stderr": logs.tail_lines(response.stderr.tail.decode(errors="replace"), logs.STDERR_MAX),
    }


def _fields(execution: Execution) -> dict[str, str]:
    """What every log line of a call carries (task_runner.server.logs)."""
    return {"request_id": execution.request_id, "caller": execution.caller.name}


def _shutting_down() -> Refusal:
    return Refusal(Reason.SHUTTING_DOWN, "the daemon is shutting down; call another", 0.0)


def _cancelled_before_run() -> PerformResponse:
    return error_response(TaskError.CANCELLED, "Cancelled", "the call was cancelled before it ran")


def options_digest(serialized: Iterable[bytes]) -> bytes:
    """A digest of options as serialized (each part of the field as it came): the same bytes, the same
    options. Taking it costs a pass of sha256, not a parse: the daemon never builds a request's options."""
    digest = hashlib.sha256()
    for part in serialized:
        digest.update(part)
    return digest.digest()


def values_digest(request: bytes) -> bytes:
    """The digest of a serialized request's options that is the same however they were serialized
    (task_runner.values.struct_digest), or b"" if they are malformed. It parses them: only a request
    under a known request_id whose options came as other bytes needs it (see `_same_options`)."""
    try:
        return struct_digest(PerformRequest.FromString(request).options)
    except DecodeError:
        return b""


@dataclass(frozen=True, eq=False)
class Generation:
    """What new calls are served with, swapped whole at a reload: a config, its tasks, and the fork
    server that imported them. Calls already running finish on the generation they started on."""

    number: int
    config: Config
    forkserver: ForkServerClient
    callers: Callers  # who may call, with what rights

    @property
    def tasks(self) -> Mapping[str, Task]:
        return self.config.catalogue


def _same_options(found: Execution | Kept, call: Call) -> bool:
    """Whether `call`, under the request_id of the execution `found`, brings its options: the same bytes,
    or other bytes of the same values (a retry from another process or language orders a map its way).

    Other bytes are parsed here, on the loop: only such a retry pays it. An execution whose task process
    has not said its options' digest (`Executor._values_known` waits for it) is taken for a different request.
    """
    if found.options_digest == call.digest:
        return True
    if isinstance(found, Kept):
        theirs = found.values_digest
    elif found.request:  # still waiting: its bytes are here
        theirs = values_digest(found.request)
    else:
        theirs = found.run.values_digest if found.run is not None else b""
    return bool(theirs) and theirs == values_digest(call.request)



class Executor:
    """Runs the calls the servicer accepted, each in a fresh task process, and answers them.

    The daemon-wide admission limits (max_running, max_queued, max_queued_bytes, the aging) and
    the idempotency cache are those of the configuration the daemon started with; a reload
    changes the tasks and their own limits, not these.
    """

    def __init__(self, generation: Generation, metrics: Metrics) -> None:
        config = generation.config
        self.generation = generation
        self.metrics = metrics
        # The queue in front of the slots, and the slot counts it chooses by.
        self.admission = Admission(config.max_running, config.max_queued, config.priority_aging_s)
        self._configure(generation)
        metrics.watch(self.admission)
        self._max_queued_bytes = config.max_queued_bytes
        self.executions = Executions(self.admission)  # what waits and runs now: the one record of it
        self._cache = AnswerCache(config.idempotency_window_s, config.idempotency_max_entries, 64 * MIB)
        self.tracer = Tracer()  # records spans once started, where OpenTelemetry is set up to
        self.draining = False  # new calls are refused
        self.stopping = False  # and calls still queued are refused too

    def swap(self, generation: Generation) -> Generation:
        """Serve new calls with `generation`; returns the one it replaces."""
        old, self.generation = self.generation, generation
        self._configure(generation)
        return old

    def _configure(self, generation: Generation) -> None:
        self.admission.configure({task.name: task.admission for task in generation.tasks.values()},
                                 {caller.name: caller.rules for caller in generation.callers.by_name.values()})

    def check_room(self, size: int) -> None:
        """Refuse a request of `size` bytes at once if waiting calls already hold all the room there is
        (each its request and QUEUED_CALL_BYTES): checked before the request is even parsed, since
        parsing a big request costs memory too."""
        held = self.executions.held_bytes
        if held and held + size + QUEUED_CALL_BYTES > self._max_queued_bytes:
            self.metrics.admission_rejected.labels("max_queued_bytes").inc()
            raise Refusal(
                Reason.QUEUE_BYTES_FULL,
                f"queue full: the calls waiting for a task process hold {held} bytes (their requests, "
                f"and {QUEUED_CALL_BYTES} bytes each; max_queued_bytes = {self._max_queued_bytes}); retry later",
                QUEUE_RETRY_S, "max_queued_bytes",
            )

    def _open(self, call: Call) -> tuple[Execution | Kept, bool]:
        """The execution of a validated call: the running or finished one of its caller's request_id, or a
        new one; and whether it was another call's. The call's request bytes go to a new execution.

        Raises:
            Refusal: the request_id was used for another request, or the daemon drains.
        """
        request_id, task = call.request_id, call.task
        if request_id:
            key = (call.caller.name, request_id)
            found = self.executions.attachable(key) or self._cache.get(key, call.received_at)
            if found is not None:
                if found.task != task.name or not _same_options(found, call):
                    raise Refusal(Reason.REQUEST_ID_REUSED,
                                  f"request_id {request_id!r} was used for a different request")
                return found, True
        if self.draining:
            raise _shutting_down()
        events = EventLog(call.received_at, self.metrics.events_dropped.inc)
        request, call.request = call.request, b""
        execution = Execution(request_id or uuid.uuid4().hex, task.name, call.caller, call.digest, request,
                              call.received_at, events, attachable=bool(request_id))
        self.executions.open(execution)  # before admission: a duplicate arriving now attaches to this one
        execution.job = asyncio.ensure_future(self._execute(execution, call))  # held by the registry, as it is
        return execution, False

    async def _values_known(self, call: Call) -> None:
        """Return once the execution of `call`'s request_id, if one runs and `call` brings its options as
        other bytes, has the digest of their values (`_same_options`): its task process gives it in its
        first frame, a moment after the hand-over (the time it takes to parse them)."""
        if not call.request_id:
            return
        found = self.executions.attachable((call.caller.name, call.request_id))
        if found is not None and found.options_digest != call.digest and not found.request:
            run = found.run
            if run is not None and not run.first_frame.done():
                await asyncio.wait((run.first_frame, run.reaped), return_when=asyncio.FIRST_COMPLETED)

    async def perform(self, call: Call, opened_as: Opened | None = None) -> Performed:
        """Run a validated call (or attach to its caller's execution under its request_id): what it came to,
        its serialized answer or the refusal it got. Raises only what ends the servicer's own call (it left):
        `opened_as` is told the execution's id and whether it was another call's first, for a caller that leaves.
        """
        try:
            await self._values_known(call)
            opened, shared = self._open(call)
        except Refusal as exc:
            return Performed(refusal=exc)
        execution_id = opened.request_id if isinstance(opened, Execution) else call.request_id
        if opened_as is not None:
            opened_as(execution_id, shared)
        try:
            answer = opened.answer if isinstance(opened, Kept) else await self._attach(opened)
        except Refusal as exc:
            return Performed(execution_id, shared, opened.ended, refusal=exc)
        return Performed(execution_id, shared, opened.ended, answer)

    async def perform_stream(self, call: Call, opened_as: Opened | None = None) -> AsyncIterator[bytes | Performed]:
        """As `perform`, but the execution's serialized PerformEvents, the response last, then what the call came
        to. The stream's caller is attached to the execution as a Perform's is: the last to leave cancels it."""
        try:
            await self._values_known(call)
            opened, shared = self._open(call)
        except Refusal as exc:
            yield Performed(refusal=exc)
            return
        if opened_as is not None:
            opened_as(opened.request_id if isinstance(opened, Execution) else call.request_id, shared)
        if isinstance(opened, Kept):
            async for event in opened.events.follow():
                yield event
            yield Performed(call.request_id, shared, opened.ended)
            return
        refusal = None
        opened.attached += 1
        try:
            async for event in opened.events.follow():
                yield event
            try:
                await opened.answer  # the events end with the response, or else the refusal is raised here
            except Refusal as exc:
                refusal = exc
        finally:
            self._detach(opened)
        yield Performed(opened.request_id, shared, opened.ended, refusal=refusal)

    def _find(self, request_id: str, caller: Caller, finished: bool) -> Execution | Kept | None:
        """The execution of `request_id` that `caller` may see: its own, or, if it may see all, anyone's
        (its own first). With `finished`, those that finished within the idempotency window too."""
        now = asyncio.get_running_loop().time()
        key = (caller.name, request_id)
        found: Execution | Kept | None = self.executions.find(key) or (self._cache.get(key, now) if finished else None)
        if found is None and caller.see_all:
            found = self.executions.find_any(request_id)
            if found is None and finished:
                found = self._cache.find(request_id, now)
        return found

    async def watch(self, request_id: str, caller: Caller) -> AsyncIterator[bytes]:
        """The serialized events of `caller`'s execution of `request_id` (anyone's, if it may see all),
        running or finished within the idempotency window: what is buffered, then each as it comes, the
        response last. Watching does not keep the execution alive.

        Raises:
            Refusal: no such execution (or its refusal, once the events end without a response); another
                caller's is not found either, with the same message (no oracle of who uses which id).
        """
        found = self._find(request_id, caller, finished=True)
        if found is None:
            raise Refusal(Reason.NO_SUCH_EXECUTION,
                          f"no execution of request_id {request_id!r} runs or finished within the idempotency window")
        async for event in found.events.follow():
            yield event
        if isinstance(found, Execution):  # the events ended without a response: say why
            await asyncio.wait((found.answer,))
            if found.answer.cancelled():
                raise Refusal(Reason.NO_SUCH_EXECUTION,
                              f"the execution of request_id {request_id!r} ended before it ran: every caller left")
            found.answer.result()  # a refusal ends the stream with its status

    def cancel(self, request_id: str, grace_s: float, caller: Caller) -> bool:
        """Stop `caller`'s execution of `request_id` (anyone's, if it may see all): told first, killed after
        `grace_s` (at once if 0); out of the queue if it waits. Returns whether it was running.

        Raises:
            Refusal: no such execution is running or waiting (another caller's is not found either).
        """
        execution = self._find(request_id, caller, finished=False)
        if not isinstance(execution, Execution):
            raise Refusal(Reason.NO_SUCH_EXECUTION, f"no execution of request_id {request_id!r} runs or waits")
        execution.cancelled = True
        if execution.run is None:
            if execution.job is not None:
                execution.job.cancel()
            return False
        if grace_s > 0:
            execution.run.notice(Stop.CANCELLED, grace_s)
        else:
            execution.run.stop(Stop.CANCELLED)
        return True

    def notice_all(self, end: float) -> None:
        """The drain ends at loop time `end`: tell each running task with a grace to stop, its grace before."""
        loop = asyncio.get_running_loop()
        for run in self.executions.runs():
            if run.grace_s > 0:
                loop.call_at(max(loop.time(), end - run.grace_s), run.notice, Stop.CANCELLED, run.grace_s)

    async def _attach(self, execution: Execution) -> bytes:
        """Wait for an execution's answer; the last caller to leave before it ends has it cancelled."""
        execution.attached += 1
        try:
            answer = await asyncio.shield(execution.answer)
        except asyncio.CancelledError:
            self._detach(execution)
            raise
        execution.attached -= 1
        return answer

    def _detach(self, execution: Execution) -> None:
        """A caller left; the last to leave before the answer has the execution cancelled."""
        execution.attached -= 1
        if execution.attached == 0 and not execution.answer.done():
            self.executions.forget(execution)
            execution.abandon()

    # -- an execution's phases: admit, take a process, assign, run, answer; then settle, once

    async def _execute(self, execution: Execution, call: Call) -> None:
        """Take one execution through its phases, whatever happens to its callers, and settle it.

        The slot is held from admission until the task's process is reaped (or, if no process
        was taken, until it settles).
        """
        spans: CallSpans | None = None
        if call.trace is not None:
            spans = self.tracer.begin(call.trace, call.task.name, execution.request_id, execution.caller.name,
                                      execution.received_at)
        try:
            settled = await self._phases(execution, call, spans)
        except Refusal as exc:
            settled = _Settled(refusal=exc)  # every caller attached is refused alike
        except asyncio.CancelledError:
            # A Cancel took it out of the queue (its callers are told so), or else every caller left before it ran.
            settled = _Settled(_cancelled_before_run() if execution.cancelled else None)
        except Exception:
            log.exception("task %s: the daemon failed to run it", execution.task, extra=_fields(execution))
            settled = _Settled(refusal=Refusal(Reason.INTERNAL, "the daemon failed to run the task"))
        self._settle(execution, call, settled, spans)

    async def _phases(self, execution: Execution, call: Call, spans: CallSpans | None) -> _Settled:
        """The phases up to the answer, in order; what they came to.

        Raises:
            Refusal: a phase refused the call.
        """
        broken = self.generation.forkserver.info.get(call.task.name)
        if broken is not None and broken.import_error:  # it cannot run: no slot, no process for it
            return _Settled(_import_failed(call.task.name, broken.import_error))
        admitted_at = await self._admit(execution, call.wants)
        if spans is not None:
            spans.admitted()
        run, task = await self._take_process(execution, call.task.name)
        if self.stopping:
            raise _shutting_down()  # (its process is killed as it settles)
        handover = self._assign(execution, call, run, task, spans)
        return await self._run(execution, run, handover, admitted_at)

    async def _admit(self, execution: Execution, wants: Wants) -> float:
        """Take a slot, waiting in the queue if need be; the loop time it was taken."""
        def queued(position: int) -> None:
            event = PerformEvent()
            event.queued.position = position
            execution.events.add(event)
        try:
            await self.admission.acquire(execution.task, wants.priority, wants.fairness_key, wants.queue_timeout_s,
                                         queued, caller=execution.caller.name)
        except QueueFull as exc:
            self.metrics.admission_rejected.labels(exc.limit).inc()
            raise Refusal(Reason.QUEUE_FULL, str(exc), exc.retry_after_s, exc.limit) from None
        except QueueTimeout as exc:
            self.metrics.admission_rejected.labels("queue_timeout_ms").inc()
            raise Refusal(Reason.QUEUE_TIMEOUT, str(exc)) from None
        admitted_at = asyncio.get_running_loop().time()
        self.executions.admitted(execution, admitted_at)
        return admitted_at

    async def _take_process(self, execution: Execution, name: str) -> tuple[Run, Task]:
        """A run in a spare process of the current generation, and the task as that generation has it."""
        generation = self.generation  # read once admitted: a reload meanwhile sends us to the new one
        while True:
            task = generation.tasks.get(name)
            if task is None:
                raise Refusal(Reason.UNKNOWN_TASK, f"task {name!r} is no longer served (the daemon was reloaded)")
            try:
                process = await generation.forkserver.take(name)
                break
            except (ForkServerDied, NoProcess) as exc:
                if generation.forkserver.retired and generation is not self.generation:
                    generation = self.generation  # a reload retired it while we waited: take the new one's
                    continue
                raise Refusal(Reason.NO_TASK_PROCESS, f"{exc}; retry", FORK_RETRY_S) from None
        run = Run(generation.forkserver, process, generation.config, task.limits.cpu_s, execution.events)
        self.executions.started(execution, run, generation)
        return run, task

    def _assign(self, execution: Execution, call: Call, run: Run, task: Task, spans: CallSpans | None) -> _Handover:
        """What the task process is told besides the request (its limits, deadline, ids, trace context); its
        watchers are told it started."""
        limits = task.process_limits()
        if run.process.cgroup:
            limits = cgroups.limit(run.process.cgroup, limits)
        if limits.processes >= 0 and run.process.uid == wire.NO_UID and "processes" not in task.limits.explicit:
            # The default limit is a task's own: under a shared uid RLIMIT_NPROC would count every process of
            # that user (the daemon's, the other tasks'), so only a limit the file sets applies there.
            limits = limits._replace(processes=frames.NO_LIMIT)
        deadline = min(asyncio.get_running_loop().time() + call.timeout_ms / 1e3, call.rpc_deadline)
        run.grace_s = call.wants.grace_s if call.wants.grace_s is not None else task.grace_ms / 1e3
        started = PerformEvent()
        started.started.pid = run.process.pid
        started.started.caller = execution.caller.name
        started.started.deadline_ms = (deadline - execution.received_at) * 1e3  # for a watcher's time left
        self.metrics.started.labels(execution.task, execution.caller.name).inc()
        execution.events.add(started)
        context = spans.run(task.name) if spans is not None else call.trace
        assignment = frames.Assignment(limits, run.process.workdir, deadline, execution.request_id,
                                       execution.caller.name, context.traceparent if context else "",
                                       context.tracestate if context else "")
        stall_s = task.heartbeat_timeout_ms / 1e3 if task.heartbeat_timeout_ms else None
        return _Handover(assignment.head(len(execution.request)), deadline, stall_s)

    async def _run(self, execution: Execution, run: Run, handover: _Handover, admitted_at: float) -> _Settled:
        """Hand the task over and run it: its response, or the runner's refusal of its options."""
        # The request goes as an argument, in no local of the executor's while the task runs.
        response, handed_at = await run.execute(handover.head, self.executions.hand_over(execution),
                                                handover.deadline, run.grace_s, handover.stall_s)
        if run.options_invalid is not None:  # the runner's own verdict, the channel's first frame, before any task code
            return _Settled(refusal=Refusal(Reason.INVALID_OPTIONS, run.options_invalid), returned=True)
        response.timings.queue_ms = (admitted_at - execution.received_at) * 1e3
        response.timings.start_ms = (handed_at - admitted_at) * 1e3
        return _Settled(response, returned=True)

    def _settle(self, execution: Execution, call: Call, settled: _Settled, spans: CallSpans | None) -> None:
        """However the phases ended, in this one place: answer every caller, end the events, let go of the request
        and the process, record how it ended, keep the answer for retries, leave the registry's reach."""
        now = asyncio.get_running_loop().time()
        answer = self._answer(execution, settled)
        execution.events.end()
        if execution.request:
            self.executions.hand_over(execution)  # given up
        if execution.run is not None and not settled.returned:
            execution.run.stop(Stop.CANCELLED)  # whatever went wrong, the process does not outlive it
        admitted_at = execution.admitted_at
        if admitted_at is not None and not settled.refused_by_runner:
            generation = execution.generation  # the task as the generation it ran in has it
            task = generation.tasks.get(execution.task, call.task) if generation is not None else call.task
            self._record(execution, task, settled.response, admitted_at, now)
        else:  # it never ran: how long it waited, and the daemon's own answer, if it gave one
            response = settled.response
            kind = TaskError.Kind.Name(response.error.kind) if response is not None else ""
            waited = (admitted_at if admitted_at is not None else now) - execution.received_at
            execution.ended = Ended(error=kind, queue_ms=waited * 1e3)
            if kind:
                self.metrics.finished.labels(execution.task, "", kind, execution.caller.name).inc()
        cancelled = settled.response is not None and settled.response.error.kind == TaskError.CANCELLED
        if answer is not None and not cancelled and execution.attachable:  # with how it ended
            self._cache.keep(execution, answer, now)
        self.executions.settle(execution)
        if spans is not None:
            spans.end(execution.ended.outcome, execution.ended.error)

    @staticmethod
    def _answer(execution: Execution, settled: _Settled) -> bytes | None:
        """The answer phase: every caller and follower of `execution` gets its response (the serialized answer,
        returned), or its refusal; or, if every caller left, nothing."""
        response = settled.response
        if response is None:
            if settled.refusal is not None:
                execution.answer.set_exception(settled.refusal)
            else:
                execution.answer.cancel()
            return None
        response.request_id = execution.request_id
        answer = response.SerializeToString()
        execution.events.finish(answer)
        execution.answer.set_result(answer)
        return answer

    def _record(self, execution: Execution, task: Task, response: PerformResponse | None, admitted_at: float,
                now: float) -> None:
        if response is None:
            verdict, outcome, kind = "lost", "", "INTERNAL"
        elif response.HasField("error"):
            kind = TaskError.Kind.Name(response.error.kind)
            verdict, outcome = f"error={kind}", ""
        else:
            outcome, kind = str(response.outcome).lower(), ""
            verdict = f"outcome={outcome}"
        queue_s = admitted_at - execution.received_at
        execution.ended = Ended(outcome, kind, queue_s * 1e3, response.timings.run_ms if response else 0.0)
        metrics = self.metrics
        metrics.finished.labels(execution.task, outcome, kind, execution.caller.name).inc()
        metrics.queue_wait.observe(queue_s)
        if response is not None:
            metrics.start.observe(response.timings.start_ms / 1e3)
            metrics.run.labels(execution.task).observe(response.timings.run_ms / 1e3)
            if response.usage.tmp_full:
                metrics.tmp_full.labels(execution.task).inc()
        fields = _fields(execution)
        if response is not None and kind and kind != "CANCELLED":
            log.warning("task %s failed: %s", execution.task, _failure_line(response.error),
                        extra={**fields, "details": _failure(execution.task, response)})
        elif response is not None and task.log_output and not kind:
            output = {name: logs.tail_lines(getattr(response, name).tail.decode(errors="replace"), logs.STDERR_MAX)
                      for name in ("stdout", "stderr")}
            log.info("task %s output", execution.task, extra={**fields, "details": output})
        log.info("task %s finished: %s in %.1f ms (%.1f ms of it queued)", execution.task, verdict,
                 (now - execution.received_at) * 1e3, queue_s * 1e3, extra=fields)

    # -- the drain and a reload

    async def wait_idle(self) -> None:
        """Return once nothing runs (no slot is held)."""
        await self.admission.wait_idle()

    async def finished(self, generation: Generation) -> None:
        """Return once no process of `generation` is running (it serves no new calls by then)."""
        while pending := [run.reaped for run in self.executions.runs(generation)]:
            await asyncio.wait(pending)

    def stop_all(self, why: Stop) -> None:
        """Have every running task killed and every queued call refused (the drain grace is over)."""
        self.stopping = True
        self.admission.refuse_waiting(_shutting_down)
        for run in self.executions.runs():
            run.stop(why)

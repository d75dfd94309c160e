"""An execution's life, in one place: admission, a spare task process, the run, the answer, the release.

    Executor.perform: the idempotency cache -> admission (a slot, or a place in the queue)
        -> a spare process of the current generation -> Run -> the answer to every caller attached
        -> the slot back once the process is reaped

The servicer (task_runner.server.service) decodes and validates a request and maps a `Refusal`
to a gRPC status; everything after that is here. `Slots` holds the one count of what runs and
the one idle event; a reload swaps the whole `Generation` new calls are served with.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from task_runner import frames
from task_runner.frames import error_response
from task_runner.server import logs, wire
from task_runner.server.admission import Admission, QueueFull, QueueTimeout
from task_runner.server.callers import Caller, Callers
from task_runner.server.config import MIB, Config, Task
from task_runner.server.events import KEPT_BYTES, EventLog
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
# What a call waiting for a task process costs the daemon besides its request's bytes (its
# execution, event log and asyncio tasks, gRPC's call and stream): 24-26 KiB of RSS measured per
# queued call, rounded up. max_queued_bytes counts it for each, so that tiny calls fill it too.
QUEUED_CALL_BYTES = 32 << 10


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
    ended: Ended | None = None  # set by the executor once it answered the call: how its execution ended
    shared: bool = False  # ... and whether that execution was another call's (a repeat of its request_id)
    execution_id: str = ""  # the request_id of the execution it opened (the daemon makes one where it had none)
    trace: TraceContext | None = None  # the caller's W3C trace context, if the call carried one


class Ended(NamedTuple):
    """How an execution ended, for the access log: the task's outcome ("true", "false") or error kind
    ("" for neither: it was refused or lost), and the time it waited for a slot and ran."""

    outcome: str = ""
    error: str = ""
    queue_ms: float = 0.0
    run_ms: float = 0.0


NOT_ENDED = Ended()


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
    run: Run | None = None
    job: asyncio.Future[None] | None = None  # admission, then the run: independent of any one caller
    answer: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attached: int = 0
    cancelled: bool = False  # a Cancel asked for it: the answer is CANCELLED even if it never ran
    ended: Ended = NOT_ENDED  # how it ended, once it has

    def abandon(self) -> None:
        """Every caller left before the answer: kill the run, or leave the queue."""
        if self.run is not None:
            self.run.stop(Stop.CANCELLED)  # the slot is freed once the process is reaped
        elif self.job is not None:
            self.job.cancel()


_Key = tuple[str, str]  # a caller's name and a request_id: a request_id is the caller's own


def _key(execution: Execution) -> _Key:
    return execution.caller.name, execution.request_id


class _Kept(NamedTuple):
    """A finished execution's answer, as little as is needed to give it again."""

    task: str
    options_digest: bytes  # as in Execution
    values_digest: bytes  # its options' values_digest, as its task process gave it (b"": none came)
    answer: bytes
    expires: float
    events: EventLog  # for a Watch after the end
    ended: Ended

    @property
    def nbytes(self) -> int:
        return len(self.answer) + len(self.options_digest) + len(self.values_digest) + self.events.nbytes


class AnswerCache:
    """Executions by caller and caller-given request_id: running ones, and finished ones' answers for `window_s`.

    Bounded by entry count and by the bytes kept; the oldest finished go first. A CANCELLED
    answer is not kept: the caller went away, and a retry should run the task.
    """

    def __init__(self, window_s: float, max_entries: int, max_bytes: int) -> None:
        self.window_s, self.max_entries, self.max_bytes = window_s, max_entries, max_bytes
        self._running: dict[_Key, Execution] = {}
        self._finished: collections.OrderedDict[_Key, _Kept] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: _Key, now: float) -> Execution | _Kept | None:
        while self._finished and next(iter(self._finished.values())).expires <= now:
            self._drop_oldest()
        return self._running.get(key) or self._finished.get(key)

    def find(self, request_id: str, now: float) -> Execution | _Kept | None:
        """The execution of `request_id` of any caller (for a caller who may see all): a scan."""
        self.get(("", ""), now)  # drop the expired
        for entries in (self._running, self._finished):
            found = next((entry for (_, rid), entry in entries.items() if rid == request_id), None)
            if found is not None:
                return found
        return None

    def add(self, execution: Execution) -> None:
        self._running[_key(execution)] = execution

    def forget(self, execution: Execution) -> None:
        """A running execution no caller waits for any more: a retry must start afresh."""
        if self._running.get(_key(execution)) is execution:
            del self._running[_key(execution)]

    def finish(self, execution: Execution, answer: bytes | None, now: float) -> None:
        key = _key(execution)
        if self._running.get(key) is not execution:
            return  # forgotten, or never kept (no caller-given request_id)
        del self._running[key]
        if answer is None or self.window_s <= 0:
            return
        execution.events.trim(KEPT_BYTES)
        values = execution.run.values_digest if execution.run is not None else b""
        kept = _Kept(execution.task, execution.options_digest, values, answer, now + self.window_s,
                     execution.events, execution.ended)
        self._finished[key] = kept
        self._bytes += kept.nbytes
        while self._finished and (len(self._finished) > self.max_entries or self._bytes > self.max_bytes):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, kept = self._finished.popitem(last=False)
        self._bytes -= kept.nbytes


def _same_options(found: Execution | _Kept, call: Call) -> bool:
    """Whether `call`, under the request_id of the execution `found`, brings its options: the same bytes,
    or other bytes of the same values (a retry from another process or language orders a map its way).

    Other bytes are parsed here, on the loop: only such a retry pays it. An execution whose task process
    has not said its options' digest (`Executor._values_known` waits for it) is taken for a different request.
    """
    if found.options_digest == call.digest:
        return True
    if isinstance(found, _Kept):
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
        # The one count of what runs, and the queue in front of the slots.
        self.admission = Admission(config.max_running, config.max_queued, config.priority_aging_s)
        self._configure(generation)
        metrics.watch(self.admission)
        self._max_queued_bytes = config.max_queued_bytes
        self._cache = AnswerCache(config.idempotency_window_s, config.idempotency_max_entries, 64 * MIB)
        self._runs: dict[Run, Generation] = {}  # runs whose process is not yet reaped
        self._live: dict[_Key, Execution] = {}  # every execution not yet answered, by caller and request id
        self.tracer = Tracer()  # records spans once started, where OpenTelemetry is set up to
        self._jobs: set[asyncio.Future[None]] = set()
        self._held_bytes = 0  # of requests not yet handed to a task process, and QUEUED_CALL_BYTES for each
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
        if self._held_bytes and self._held_bytes + size + QUEUED_CALL_BYTES > self._max_queued_bytes:
            self.metrics.admission_rejected.labels("max_queued_bytes").inc()
            raise Refusal(
                Reason.QUEUE_BYTES_FULL,
                f"queue full: the calls waiting for a task process hold {self._held_bytes} bytes (their requests, "
                f"and {QUEUED_CALL_BYTES} bytes each; max_queued_bytes = {self._max_queued_bytes}); retry later",
                QUEUE_RETRY_S, "max_queued_bytes",
            )

    def _open(self, call: Call) -> Execution | _Kept:
        """The execution of a validated call: the running or finished one of its caller's request_id, or a
        new one. The call's request bytes go to the execution.

        Raises:
            Refusal: the request_id was used for another request, or the daemon drains.
        """
        request_id, task = call.request_id, call.task
        found = self._cache.get((call.caller.name, request_id), call.received_at) if request_id else None
        if found is not None:
            if found.task != task.name or not _same_options(found, call):
                raise Refusal(Reason.REQUEST_ID_REUSED, f"request_id {request_id!r} was used for a different request")
            call.shared = True
            return found
        if self.draining:
            raise _shutting_down()
        events = EventLog(call.received_at, self.metrics.events_dropped.inc)
        request, call.request = call.request, b""
        execution = Execution(request_id or uuid.uuid4().hex, task.name, call.caller, call.digest, request,
                              call.received_at, events)
        self._held_bytes += len(request) + QUEUED_CALL_BYTES
        call.execution_id = execution.request_id
        if request_id:
            self._cache.add(execution)  # before admission: a duplicate arriving now attaches to this one
        self._live[_key(execution)] = execution
        execution.job = asyncio.ensure_future(self._execute(execution, call))
        self._jobs.add(execution.job)  # a reference, so the job is not collected mid-run
        execution.job.add_done_callback(self._jobs.discard)
        return execution

    async def _values_known(self, call: Call) -> None:
        """Return once the execution of `call`'s request_id, if one runs and `call` brings its options as
        other bytes, has the digest of their values (`_same_options`): its task process gives it in its
        first frame, a moment after the hand-over (the time it takes to parse them)."""
        if not call.request_id:
            return
        found = self._cache.get((call.caller.name, call.request_id), call.received_at)
        if isinstance(found, Execution) and found.options_digest != call.digest and not found.request:
            run = found.run
            if run is not None and not run.first_frame.done():
                await asyncio.wait((run.first_frame, run.reaped), return_when=asyncio.FIRST_COMPLETED)

    async def perform(self, call: Call) -> bytes:
        """Run a validated call (or attach to its caller's execution under its request_id); its serialized
        answer.

        Raises:
            Refusal: the call is not run, or could not be.
        """
        await self._values_known(call)
        opened = self._open(call)
        try:
            return opened.answer if isinstance(opened, _Kept) else await self._attach(opened)
        finally:
            call.ended = opened.ended

    async def perform_stream(self, call: Call) -> AsyncIterator[bytes]:
        """As `perform`, but the execution's serialized PerformEvents, the response last. The stream's
        caller is attached to the execution as a Perform's is: the last to leave cancels it."""
        await self._values_known(call)
        opened = self._open(call)
        try:
            if isinstance(opened, _Kept):
                async for event in opened.events.follow():
                    yield event
                return
            opened.attached += 1
            try:
                async for event in opened.events.follow():
                    yield event
                await opened.answer  # the events end with the response, or else the refusal is raised here
            finally:
                self._detach(opened)
        finally:
            call.ended = opened.ended

    def _find(self, request_id: str, caller: Caller, finished: bool) -> Execution | _Kept | None:
        """The execution of `request_id` that `caller` may see: its own, or, if it may see all, anyone's
        (its own first). With `finished`, those that finished within the idempotency window too."""
        now = asyncio.get_running_loop().time()
        key = (caller.name, request_id)
        found: Execution | _Kept | None = self._live.get(key) or (self._cache.get(key, now) if finished else None)
        if found is None and caller.see_all:
            found = next((e for (_, rid), e in self._live.items() if rid == request_id), None)
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
        for run in list(self._runs):
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
            self._cache.forget(execution)
            execution.abandon()

    def _release_request(self, execution: Execution) -> bytes:
        """The request's bytes, handed over (or given up): they, and the call, no longer count as waiting.
        Called once for each execution: a request is never empty (it names its task)."""
        request, execution.request = execution.request, b""
        self._held_bytes -= len(request) + QUEUED_CALL_BYTES
        return request

    async def _admit(self, execution: Execution, task: Task, wants: Wants) -> float:
        """Take a slot, waiting in the queue if need be; the loop time it was taken."""
        def queued(position: int) -> None:
            event = PerformEvent()
            event.queued.position = position
            execution.events.add(event)
        try:
            await self.admission.acquire(task.name, wants.priority, wants.fairness_key, wants.queue_timeout_s,
                                         queued, caller=execution.caller.name)
        except QueueFull as exc:
            self.metrics.admission_rejected.labels(exc.limit).inc()
            raise Refusal(Reason.QUEUE_FULL, str(exc), exc.retry_after_s, exc.limit) from None
        except QueueTimeout as exc:
            self.metrics.admission_rejected.labels("queue_timeout_ms").inc()
            raise Refusal(Reason.QUEUE_TIMEOUT, str(exc)) from None
        return asyncio.get_running_loop().time()

    async def _start(self, execution: Execution, name: str, admitted_at: float) -> tuple[Run, Task]:
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
        run = execution.run = Run(generation.forkserver, process, generation.config, task.limits.cpu_s,
                                  execution.events)
        self._runs[run] = generation
        run.reaped.add_done_callback(lambda _: self._reaped(run, name, execution.caller.name, admitted_at))
        return run, task

    async def _execute(self, execution: Execution, call: Call) -> None:
        """Admit, run and answer one execution, whatever happens to its callers; record it.

        The slot is held from admission until the task's process is reaped (or, if no process
        was started, until this ends).
        """
        loop = asyncio.get_running_loop()
        task, wants = call.task, call.wants
        response: PerformResponse | None = None
        answer: bytes | None = None
        admitted_at = execution.received_at
        admitted = refused = False
        spans: CallSpans | None = None
        if call.trace is not None:
            spans = self.tracer.begin(call.trace, task.name, execution.request_id, execution.caller.name,
                                      execution.received_at)
        try:
            broken = self.generation.forkserver.info.get(task.name)
            if broken is not None and broken.import_error:  # it cannot run: no slot, no process for it
                response = _import_failed(task.name, broken.import_error)
                answer = self._answer(execution, response)
                return
            admitted_at = await self._admit(execution, task, wants)
            admitted = True
            if spans is not None:
                spans.admitted()
            run, task = await self._start(execution, task.name, admitted_at)
            if self.stopping:
                run.stop(Stop.CANCELLED)
                raise _shutting_down()
            limits = task.process_limits()
            if run.process.cgroup:
                limits = cgroups.limit(run.process.cgroup, limits)
            if limits.processes >= 0 and run.process.uid == wire.NO_UID and "processes" not in task.limits.explicit:
                # The default limit is a task's own: under a shared uid RLIMIT_NPROC would count every process of
                # that user (the daemon's, the other tasks'), so only a limit the file sets applies there.
                limits = limits._replace(processes=frames.NO_LIMIT)
            deadline = min(loop.time() + call.timeout_ms / 1e3, call.rpc_deadline)
            run.grace_s = wants.grace_s if wants.grace_s is not None else task.grace_ms / 1e3
            stall_s = task.heartbeat_timeout_ms / 1e3 if task.heartbeat_timeout_ms else None
            request = self._release_request(execution)
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
            response, handed_at = await run.execute(assignment.head(len(request)), request, deadline, run.grace_s,
                                                    stall_s)
            if run.options_invalid is not None:
                refused = True  # the runner's own verdict, the channel's first frame, before any task code ran
                raise Refusal(Reason.INVALID_OPTIONS, run.options_invalid)
            response.timings.queue_ms = (admitted_at - execution.received_at) * 1e3
            response.timings.start_ms = (handed_at - admitted_at) * 1e3
            answer = self._answer(execution, response)
        except Refusal as exc:
            execution.answer.set_exception(exc)  # every caller attached is refused alike
        except asyncio.CancelledError:
            if execution.cancelled:  # a Cancel took it out of the queue: its callers are told so
                response = error_response(TaskError.CANCELLED, "Cancelled", "the call was cancelled before it ran")
                answer = self._answer(execution, response)
            else:
                execution.answer.cancel()  # every caller left before it ran
        except Exception:
            log.exception("task %s: the daemon failed to run it", execution.task, extra=_fields(execution))
            execution.answer.set_exception(Refusal(Reason.INTERNAL, "the daemon failed to run the task"))
        finally:
            if self._live.get(_key(execution)) is execution:  # not a later one under the same id
                del self._live[_key(execution)]
            execution.events.end()
            if execution.request:
                self._release_request(execution)
            if execution.run is None:
                if admitted:
                    self.admission.release(execution.task, caller=execution.caller.name)
            elif response is None:
                execution.run.stop(Stop.CANCELLED)  # whatever went wrong, the process does not outlive it
            if admitted and not refused:
                self._record(execution, task, response, admitted_at, loop.time())
            else:  # it never ran: how long it waited, and the daemon's own answer, if it gave one
                kind = TaskError.Kind.Name(response.error.kind) if response is not None and answer else ""
                waited = (admitted_at if admitted else loop.time()) - execution.received_at
                execution.ended = Ended(error=kind, queue_ms=waited * 1e3)
                if kind:
                    self.metrics.finished.labels(execution.task, "", kind, execution.caller.name).inc()
            cancelled = response is not None and response.error.kind == TaskError.CANCELLED
            self._cache.finish(execution, None if cancelled else answer, loop.time())  # with how it ended
            if spans is not None:
                spans.end(execution.ended.outcome, execution.ended.error)

    @staticmethod
    def _answer(execution: Execution, response: PerformResponse) -> bytes:
        """Give every caller and follower of `execution` its response; the serialized answer."""
        response.request_id = execution.request_id
        answer = response.SerializeToString()
        execution.events.finish(answer)
        execution.answer.set_result(answer)
        return answer

    def _reaped(self, run: Run, task: str, caller: str, admitted_at: float) -> None:
        """The task's process is gone: its slot is free."""
        del self._runs[run]
        self.admission.release(task, asyncio.get_running_loop().time() - admitted_at, caller=caller)

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

    async def wait_idle(self) -> None:
        """Return once nothing runs (no slot is held)."""
        await self.admission.wait_idle()

    async def finished(self, generation: Generation) -> None:
        """Return once no process of `generation` is running (it serves no new calls by then)."""
        while pending := [run.reaped for run, of in self._runs.items() if of is generation]:
            await asyncio.wait(pending)

    def stop_all(self, why: Stop) -> None:
        """Have every running task killed and every queued call refused (the drain grace is over)."""
        self.stopping = True
        self.admission.refuse_waiting(_shutting_down)
        for run in list(self._runs):
            run.stop(why)

"""The TaskRunner gRPC service: validates requests, admits them through the slots, runs them, logs them.

Request problems become gRPC status codes here, in `RequestError`, and nowhere else; task
failures are data in an OK response.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from task_runner.server import cgroups, wire
from task_runner.server.config import Config, Limits
from task_runner.server.metrics import Metrics
from task_runner.server.slots import QueueFull, Slots
from task_runner.server.supervisor import FORK_RETRY_S, ForkServerClient, ForkServerDied, NoProcess, Run, Stop
from task_runner.v1.task_runner_pb2 import (
    DESCRIPTOR,
    ListTasksRequest,
    ListTasksResponse,
    PerformRequest,
    PerformResponse,
    TaskError,
    TaskInfo,
)

log = logging.getLogger("task_runner.server")
SERVICE_NAME = DESCRIPTOR.services_by_name["TaskRunner"].full_name
MAX_REQUEST_ID = 128
RPC_DEADLINE_MARGIN_S = 0.05  # end a task this long before the RPC deadline, so its answer still arrives
MIB = 1 << 20
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "task_runner.v1.TaskRunner"
QUEUE_RETRY_S = 0.1  # the retry delay a full queue suggests


def _reused(request_id: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request_id!r} was used for a different request")


def _options_digest(options: Struct) -> bytes:
    """The same for the same options however a caller serialized them (map order varies)."""
    return hashlib.sha256(options.SerializeToString(deterministic=True)).digest()


class RequestError(Exception):
    """A request the daemon refuses: carries the gRPC status code to answer with.

    A refusal that a retry may cure carries a `reason` and a `retry_after_s`: they travel as
    `google.rpc.ErrorInfo` and `google.rpc.RetryInfo` in the status details, which a caller in any
    language reads (the Python client retries on them; nothing reads the message).
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", retry_after_s: float | None = None,
                 ) -> None:
        super().__init__(message)
        self.code, self.reason, self.retry_after_s = code, reason, retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The status details, as gRPC carries them (grpc-status-details-bin), or none."""
        if not self.reason:
            return ()
        status = Status(code=self.code.value[0], message=str(self))
        status.details.add().Pack(ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        if self.retry_after_s is not None:
            retry = RetryInfo()
            retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=self.retry_after_s))
            status.details.add().Pack(retry)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


@dataclass(frozen=True)
class _Task:
    name: str
    default_timeout_ms: int
    max_timeout_ms: int
    limits: wire.Limits
    cgroup_limits: tuple[int | None, int | None]  # memory.max and pids.max
    cpu_s: int | None  # its CPU time limit: a SIGKILL past it is the kernel's, at the hard limit


def _limit_values(limits: Limits) -> wire.Limits:
    def value(v: int | None, scale: int = 1) -> int:
        return wire.NO_LIMIT if v is None else v * scale
    return wire.Limits(value(limits.memory_mb, MIB), value(limits.cpu_s), value(limits.open_files),
                       value(limits.processes), value(limits.file_size_mb, MIB))


@dataclass(eq=False)
class Execution:
    """One run of a task. Every call with the same request_id attaches to it and gets its answer."""

    request_id: str
    task: str
    options_digest: bytes  # sha256 of the options, to tell a different request under the same request_id
    request: bytes  # the raw request, until it is handed to the task process
    run: Run | None = None
    job: asyncio.Future[None] | None = None  # admission, then the run: independent of any one caller
    answer: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attached: int = 0

    def abandon(self) -> None:
        """Every caller left before the answer: kill the run, or leave the queue."""
        if self.run is not None:
            self.run.stop(Stop.CANCELLED)  # the slot is freed once the process is reaped
        elif self.job is not None:
            self.job.cancel()


class _Kept(NamedTuple):
    """A finished execution's answer, as little as is needed to give it again."""

    task: str
    options_digest: bytes  # as in Execution
    answer: bytes
    expires: float


class AnswerCache:
    """Executions by caller-given request_id: running ones, and finished ones' answers for `window_s`.

    Bounded by entry count and by the bytes kept; the oldest finished go first. A CANCELLED
    answer is not kept: the caller went away, and a retry should run the task.
    """

    def __init__(self, window_s: float, max_entries: int, max_bytes: int) -> None:
        self.window_s, self.max_entries, self.max_bytes = window_s, max_entries, max_bytes
        self._running: dict[str, Execution] = {}
        self._finished: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._bytes = 0

    def get(self, request_id: str, now: float) -> Execution | _Kept | None:
        while self._finished and next(iter(self._finished.values())).expires <= now:
            self._drop_oldest()
        return self._running.get(request_id) or self._finished.get(request_id)

    def add(self, execution: Execution) -> None:
        self._running[execution.request_id] = execution

    def forget(self, execution: Execution) -> None:
        """A running execution no caller waits for any more: a retry must start afresh."""
        if self._running.get(execution.request_id) is execution:
            del self._running[execution.request_id]

    def finish(self, execution: Execution, answer: bytes | None, now: float) -> None:
        if self._running.get(execution.request_id) is not execution:
            return  # forgotten, or never kept (no caller-given request_id)
        del self._running[execution.request_id]
        if answer is None or self.window_s <= 0:
            return
        kept = _Kept(execution.task, execution.options_digest, answer, now + self.window_s)
        self._finished[execution.request_id] = kept
        self._bytes += len(answer) + len(kept.options_digest)
        while self._finished and (len(self._finished) > self.max_entries or self._bytes > self.max_bytes):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, kept = self._finished.popitem(last=False)
        self._bytes -= len(kept.answer) + len(kept.options_digest)


class TaskRunnerService:
    """Serves Perform and ListTasks with the tasks of the current fork server."""

    def __init__(self, config: Config, forkserver: ForkServerClient, metrics: Metrics) -> None:
        self._config = config
        self.forkserver = forkserver
        self.metrics = metrics
        self.slots = Slots(config.max_running, config.max_queued)
        metrics.running.set_function(lambda: self.slots.running)
        metrics.queued.set_function(lambda: self.slots.queued)
        self._tasks = self._resolve(config)
        self._cache = AnswerCache(config.idempotency_window_s, config.idempotency_max_entries, 64 * MIB)
        self._runs: set[Run] = set()
        self._executing: set[asyncio.Future[None]] = set()
        self._held_bytes = 0  # of requests not yet handed to a task process
        self.draining = False  # new calls are refused
        self.stopping = False  # and calls still queued are refused too

    @staticmethod
    def _resolve(config: Config) -> dict[str, _Task]:
        tasks = {}
        for name, task in config.all_tasks().items():
            limits = config.limits.merged(task.limits)
            memory = limits.memory_mb * MIB if limits.memory_mb is not None else None
            tasks[name] = _Task(name, *config.timeouts_ms(task), _limit_values(limits), (memory, limits.processes),
                                limits.cpu_s)
        return tasks

    def reload(self, config: Config, forkserver: ForkServerClient) -> ForkServerClient:
        """Serve new calls with a new fork server and task list; returns the old fork server."""
        old, self.forkserver, self._config = self.forkserver, forkserver, config
        self._tasks = self._resolve(config)
        return old

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """The service's handlers, taking and giving raw bytes so that decoding errors are ours to report."""
        def raw(behaviour: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(behaviour)
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Perform": raw(self.perform), "ListTasks": raw(self.list_tasks)},
        )

    def task_names(self) -> list[str]:
        return sorted(self._tasks)

    async def list_tasks(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            ListTasksRequest.FromString(request)
        except DecodeError:
            await self._abort(context, RequestError(grpc.StatusCode.INVALID_ARGUMENT, "malformed ListTasksRequest"))
        response = ListTasksResponse()
        for task in sorted(self._tasks.values(), key=lambda t: t.name):
            info = self.forkserver.info.get(task.name)
            response.tasks.append(TaskInfo(
                name=task.name, default_timeout_ms=task.default_timeout_ms, max_timeout_ms=task.max_timeout_ms,
                description=info.description if info else "", import_error=info.import_error if info else "",
            ))
        return response.SerializeToString()

    async def perform(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        loop = asyncio.get_running_loop()
        received_at = loop.time()
        remaining = context.time_remaining()
        rpc_deadline = received_at + remaining - RPC_DEADLINE_MARGIN_S if remaining is not None else float("inf")
        try:
            # Refused before it is even parsed: parsing a big request costs memory too.
            if self._held_bytes and self._held_bytes + len(request) > self._config.max_queued_bytes:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full: {self._held_bytes} bytes of requests wait for a task process "
                    f"(max_queued_bytes = {self._config.max_queued_bytes}); retry later",
                    "QUEUE_BYTES_FULL", QUEUE_RETRY_S,
                )
            parsed, task = self._validate(request)
            request_id, timeout_ms = parsed.request_id, parsed.timeout_ms or task.default_timeout_ms
            # Only a request_id needs the options again (to tell a different request under it): a
            # digest of them, and the parsed copy goes now. The raw bytes are all a waiting call holds.
            digest = _options_digest(parsed.options) if request_id else b""
            del parsed
            found = self._cache.get(request_id, received_at) if request_id else None
            if found is not None:
                if found.task != task.name or found.options_digest != digest:
                    raise _reused(request_id)
                return found.answer if isinstance(found, _Kept) else await self._attach(found)
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down; call another",
                                   "SHUTTING_DOWN", 0.0)
            execution = Execution(request_id or uuid.uuid4().hex, task.name, digest, request)
            self._held_bytes += len(request)
            if request_id:
                self._cache.add(execution)  # before admission: a duplicate arriving now attaches to this one
            execution.job = asyncio.ensure_future(self._execute(execution, task, timeout_ms, rpc_deadline, received_at))
            self._executing.add(execution.job)  # a reference, so the job is not collected mid-run
            execution.job.add_done_callback(self._executing.discard)
            del request
            return await self._attach(execution)
        except RequestError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort raises

    def _release_request(self, execution: Execution) -> bytes:
        """The request's bytes, handed over (or given up): they no longer count as waiting."""
        request, execution.request = execution.request, b""
        self._held_bytes -= len(request)
        return request

    async def _attach(self, execution: Execution) -> bytes:
        """Wait for an execution's answer; the last caller to leave before it ends has it cancelled."""
        execution.attached += 1
        try:
            return await asyncio.shield(execution.answer)
        except asyncio.CancelledError:
            execution.attached -= 1
            if execution.attached == 0 and not execution.answer.done():
                self._cache.forget(execution)
                execution.abandon()
            raise

    def _validate(self, request: bytes) -> tuple[PerformRequest, _Task]:
        try:
            parsed = PerformRequest.FromString(request)
        except DecodeError:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "malformed PerformRequest") from None
        if not parsed.task:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "task: a task name is required")
        task = self._tasks.get(parsed.task)
        if task is None:
            names = ", ".join(self.task_names()[:20])
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown task {parsed.task[:100]!r}; this daemon serves: {names}",
            )
        if parsed.timeout_ms > task.max_timeout_ms:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_ms {parsed.timeout_ms} is above the maximum of task {task.name!r} ({task.max_timeout_ms} ms)",
            )
        # The options' values are checked (finite numbers, bounded nesting) by the task process as it
        # converts them: walking a 4 MiB Struct here, in Python, would stall every other call.
        if len(parsed.request_id) > MAX_REQUEST_ID:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id is longer than {MAX_REQUEST_ID} bytes")
        if not parsed.request_id.isprintable():  # it goes into log lines: no newline may forge one
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id must be printable text (no newlines or control characters)",
            )
        return parsed, task

    async def _execute(
        self, execution: Execution, task: _Task, timeout_ms: int, rpc_deadline: float, received_at: float,
    ) -> None:
        """Admit, run and answer one execution, whatever happens to its callers; log it.

        The slot is held from admission until the task's process is reaped (or, if no process
        was started, until this ends).
        """
        loop = asyncio.get_running_loop()
        response: PerformResponse | None = None
        answer: bytes | None = None
        admitted_at = received_at
        admitted = refused = False
        try:
            try:
                await self.slots.acquire()
            except QueueFull:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full: {self.slots.running} tasks running and {self.slots.queued} queued; retry later",
                    "QUEUE_FULL", QUEUE_RETRY_S,
                ) from None
            admitted, admitted_at = True, loop.time()
            forkserver = self.forkserver  # read once admitted: a reload meanwhile sends us to the new one
            while True:
                try:
                    process = await forkserver.take()
                    break
                except (ForkServerDied, NoProcess) as exc:
                    if forkserver.retired and forkserver is not self.forkserver:
                        forkserver = self.forkserver  # a reload retired it while we waited: take the new one's
                        continue
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry", "NO_TASK_PROCESS",
                                       FORK_RETRY_S) from None
            run = execution.run = Run(forkserver, process, self._config, task.cpu_s)
            self._runs.add(run)
            run.reaped.add_done_callback(lambda _: self._reaped(run))
            if self.stopping:
                run.stop(Stop.CANCELLED)
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down; call another",
                                   "SHUTTING_DOWN", 0.0)
            limits = task.limits
            if process.cgroup:
                cgroups.set_limits(process.cgroup, *task.cgroup_limits)  # cgroups are reused: always
                if cgroups.has_pids_max(process.cgroup) and limits.processes != wire.NO_LIMIT:
                    limits = limits._replace(processes=wire.BY_CGROUP)  # pids.max binds the tree: no per-user NPROC
            deadline = min(loop.time() + timeout_ms / 1e3, rpc_deadline)
            request = self._release_request(execution)
            response, handed_at = await run.execute(wire.Assignment(limits, process.workdir).head(len(request)),
                                                    request, deadline)
            if response.error.kind == TaskError.KIND_UNSPECIFIED and response.error.type == wire.INVALID_OPTIONS:
                refused = True  # found by the task process as it read them, before any task code ran
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, response.error.message)
            response.request_id = execution.request_id
            response.timings.queue_ms = (admitted_at - received_at) * 1e3
            response.timings.start_ms = (handed_at - admitted_at) * 1e3
            answer = response.SerializeToString()
            execution.answer.set_result(answer)
        except RequestError as exc:
            execution.answer.set_exception(exc)  # every caller attached is refused alike
        except asyncio.CancelledError:
            execution.answer.cancel()  # every caller left before it ran
        except Exception:
            log.exception("task %s: the daemon failed to run it", execution.task,
                          extra={"request_id": execution.request_id})
            execution.answer.set_exception(RequestError(grpc.StatusCode.INTERNAL, "the daemon failed to run the task"))
        finally:
            if execution.request:
                self._release_request(execution)
            if execution.run is None:
                if admitted:
                    self.slots.release()
            elif response is None:
                execution.run.stop(Stop.CANCELLED)  # whatever went wrong, the process does not outlive it
            cancelled = response is not None and response.error.kind == TaskError.CANCELLED
            self._cache.finish(execution, None if cancelled else answer, loop.time())
            if admitted and not refused:
                self._record(execution, response, received_at, admitted_at, loop.time())

    def _reaped(self, run: Run) -> None:
        """The task's process is gone: its slot is free."""
        self._runs.discard(run)
        self.slots.release()

    def _record(
        self, execution: Execution, response: PerformResponse | None, received_at: float, admitted_at: float,
        now: float,
    ) -> None:
        if response is None:
            verdict, outcome, kind = "lost", "", "INTERNAL"
        elif response.HasField("error"):
            kind = TaskError.Kind.Name(response.error.kind)
            verdict, outcome = f"error={kind}", ""
        else:
            outcome, kind = str(response.outcome).lower(), ""
            verdict = f"outcome={outcome}"
        metrics = self.metrics
        metrics.finished.labels(execution.task, outcome, kind).inc()
        metrics.queue_wait.observe(admitted_at - received_at)
        if response is not None:
            metrics.start.observe(response.timings.start_ms / 1e3)
            metrics.run.labels(execution.task).observe(response.timings.run_ms / 1e3)
        log.info("task %s finished: %s in %.1f ms", execution.task, verdict, (now - received_at) * 1e3,
                 extra={"request_id": execution.request_id})

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], error: RequestError) -> None:
        self.metrics.rejected.labels(error.code.name).inc()
        await context.abort(error.code, str(error), trailing_metadata=error.trailing_metadata())

    def stop_all(self, why: Stop) -> None:
        """Have every running task killed and every queued call refused (the drain grace is over)."""
        self.stopping = True
        for run in list(self._runs):
            run.stop(why)

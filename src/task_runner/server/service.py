"""The TaskRunner gRPC servicer: decodes and validates requests, hands them to the executor, maps refusals.

Request problems become gRPC status codes here, in `RequestError`, and nowhere else: each refusal is a
`Reason`, which holds its status (task_runner.server.execution, the one table of them); task failures are
data in an OK response. What happens to an accepted call is the executor's
(task_runner.server.execution). A Perform is read as PerformRequestWire, its options left as bytes: the
daemon never builds them (a Struct may hold hundreds of thousands of values, whose objects would stop
the event loop and outweigh the request); the task process parses and checks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import ErrorInfo, QuotaFailure, RetryInfo
from google.rpc.status_pb2 import Status

from task_runner.server import sandboxes
from task_runner.server.access import Entry, peer_of
from task_runner.server.callers import Caller
from task_runner.server.config import Task
from task_runner.server.execution import Call, Executor, Performed, Reason, Refusal, Wants, options_digest
from task_runner.server.metrics import Metrics
from task_runner.server.security import UNAUTHENTICATED
from task_runner.server.tracing import TraceContext
from task_runner.v1.internal_pb2 import PerformRequestWire
from task_runner.v1.task_runner_pb2 import (
    DESCRIPTOR,
    CancelRequest,
    CancelResponse,
    ListTasksRequest,
    ListTasksResponse,
    TaskInfo,
    WatchRequest,
)

SERVICE_NAME = DESCRIPTOR.services_by_name["TaskRunner"].full_name
MAX_REQUEST_ID = 128
# The metadata that carries a call's request id, for a load balancer to hash (gRPC's ring_hash, Envoy's
# hash_policy): every call of a request id, its retries, Watch and Cancel, reaches the same daemon.
REQUEST_ID_HEADER = "task-runner-request-id"
MAX_FAIRNESS_KEY = 128
# A task is ended this long before its RPC's deadline, so that its answer (the kill, the reap, the report) still
# arrives in time: a tenth of the time the call had, from 50 ms to 1 s. A flat 50 ms was too little for a
# sandboxed task's teardown on a busy machine (the caller got DEADLINE_EXCEEDED instead of TIMEOUT).
RPC_DEADLINE_MARGIN_S = (0.05, 1.0)


def rpc_deadline_margin(remaining_s: float) -> float:
    low, high = RPC_DEADLINE_MARGIN_S
    return min(high, max(low, remaining_s / 10))
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "task_runner.v1.TaskRunner"


class RequestError(Exception):
    """A request the daemon refuses, for `reason`: answered with the reason's gRPC status code.

    A public reason, one a caller may act on, also travels as its name, with a retry delay
    (`retry_after_s`) when a retry may cure it, and the limit hit (`quota`) when one was:
    as `google.rpc.ErrorInfo`, `google.rpc.RetryInfo` and `google.rpc.QuotaFailure` in the status
    details, which a caller in any language reads (the Python client retries on them; nothing
    reads the message). A private reason's are its status and message alone.
    """

    def __init__(self, reason: Reason, message: str, retry_after_s: float | None = None, quota: str = "",
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason, self.code, self.retry_after_s, self.quota = reason, reason.code, retry_after_s, quota
        self.metadata = metadata or {}  # ErrorInfo.metadata

    @classmethod
    def of(cls, refusal: Refusal) -> RequestError:
        """The status for the executor's refusal."""
        return cls(refusal.reason, str(refusal), refusal.retry_after_s, refusal.quota)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The status details, as gRPC carries them (grpc-status-details-bin), or none."""
        if not self.reason.public:
            return ()
        status = Status(code=self.code.value[0], message=str(self))
        status.details.add().Pack(ErrorInfo(reason=self.reason.error_reason, domain=ERROR_DOMAIN,
                                            metadata=self.metadata))
        if self.retry_after_s is not None:
            retry = RetryInfo()
            retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=self.retry_after_s))
            status.details.add().Pack(retry)
        if self.quota:
            failure = QuotaFailure()
            failure.violations.add(subject=self.quota, description=str(self))
            status.details.add().Pack(failure)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


class TaskRunnerService:
    """Serves Perform and ListTasks with the executor's current generation of tasks."""

    def __init__(self, executor: Executor, metrics: Metrics) -> None:
        self._executor = executor
        self._metrics = metrics

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """The service's handlers, taking and giving raw bytes so that decoding errors are ours to report."""
        def raw(behaviour: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(_unary(behaviour))

        def raw_stream(behaviour: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_stream_rpc_method_handler(_streaming(behaviour))
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Perform": raw(self.perform), "PerformStream": raw_stream(self.perform_stream),
            "Watch": raw_stream(self.watch), "Cancel": raw(self.cancel), "ListTasks": raw(self.list_tasks),
        })

    async def list_tasks(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with self._access("ListTasks", request, context) as entry:
            caller = await self._caller(context, entry)
            try:
                self._parse(ListTasksRequest, request)
            except RequestError as exc:
                await self._abort(context, exc, entry)
            generation = self._executor.generation
            response = ListTasksResponse()
            for task in generation.tasks.values():
                if not caller.may_run(task.name):
                    continue
                info = generation.forkserver.info.get(task.name)
                rules = task.admission
                response.tasks.append(TaskInfo(
                    name=task.name, default_timeout_ms=task.default_timeout_ms, max_timeout_ms=task.max_timeout_ms,
                    description=info.description if info else "", import_error=info.import_error if info else "",
                    max_running=rules.max_running or 0, max_queued=rules.max_queued or 0,
                    rate_per_s=rules.rate_per_s or 0.0, burst=rules.burst if rules.rate_per_s else 0,
                    grace_ms=task.grace_ms, heartbeat_timeout_ms=task.heartbeat_timeout_ms or 0,
                    sandbox=sandboxes.message(generation.forkserver.sandbox_of(task.name)),
                ))
            answer = response.SerializeToString()
            entry.bytes_out = len(answer)
            return answer

    async def perform(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with self._access("Perform", request, context) as entry:
            caller = await self._caller(context, entry)
            call = performed = None
            try:
                call = self._accept(request, context, caller, entry)
                performed = await self._executor.perform(call, partial(_opened, entry, call))
                if performed.refusal is not None:
                    await self._abort(context, performed.refusal, entry)
            except (RequestError, Refusal) as exc:
                await self._abort(context, exc, entry)
                raise AssertionError("unreachable") from exc  # abort raises
            finally:
                _ended(entry, call, performed)
            entry.bytes_out = len(performed.answer)
            return performed.answer

    async def perform_stream(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any],
                             ) -> AsyncIterator[bytes]:
        with self._access("PerformStream", request, context) as entry:
            caller = await self._caller(context, entry)
            call = performed = None
            try:
                call = self._accept(request, context, caller, entry)
                async for event in self._executor.perform_stream(call, partial(_opened, entry, call)):
                    if isinstance(event, Performed):  # the last: what the call came to
                        performed = event
                    else:
                        entry.bytes_out += len(event)
                        yield event
                if performed is not None and performed.refusal is not None:
                    await self._abort(context, performed.refusal, entry)
            except (RequestError, Refusal) as exc:
                await self._abort(context, exc, entry)
            finally:
                _ended(entry, call, performed)

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        with self._access("Watch", request, context) as entry:
            caller = await self._caller(context, entry)
            entry.shared = True
            try:
                request_id = agreed_id(self._parse(WatchRequest, request).request_id, context.invocation_metadata())
                entry.request_id = _loggable(request_id)
                async for event in self._executor.watch(request_id, caller):
                    entry.bytes_out += len(event)
                    yield event
            except (RequestError, Refusal) as exc:
                await self._abort(context, exc, entry)

    async def cancel(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with self._access("Cancel", request, context) as entry:
            caller = await self._caller(context, entry)
            try:
                parsed = self._parse(CancelRequest, request)
                request_id = agreed_id(parsed.request_id, context.invocation_metadata())
                entry.request_id = _loggable(request_id)
                was_running = self._executor.cancel(request_id, parsed.grace_ms / 1e3, caller)
            except (RequestError, Refusal) as exc:
                await self._abort(context, exc, entry)
                raise AssertionError("unreachable") from exc
            answer = CancelResponse(was_running=was_running).SerializeToString()
            entry.bytes_out = len(answer)
            return answer

    @staticmethod
    @contextlib.contextmanager
    def _access(method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[Entry]:
        """The call's access record, written as the call ends, however it ends."""
        entry = Entry(method, peer_of(context), "", len(request), time.monotonic())
        try:
            yield entry
        except (asyncio.CancelledError, GeneratorExit):
            entry.status = "CANCELLED"  # the caller left (or the daemon stopped) before the answer
            raise
        except Exception:
            if entry.status == "OK":  # not a refusal we made: an abort we made has set its status
                entry.status = "UNKNOWN"
            raise
        finally:
            entry.write()

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any], entry: Entry) -> Caller:
        """Who makes this call (task_runner.server.callers); a call that proves no one is refused here."""
        callers = self._executor.generation.callers
        if not callers.required:
            caller = callers.identify(None, None) or Caller("")
        else:
            found = callers.identify(context.invocation_metadata(), context.auth_context())
            if found is None:
                await self._abort(context, RequestError(Reason.UNAUTHENTICATED, UNAUTHENTICATED), entry)
                raise AssertionError("unreachable")
            caller = found
        entry.caller = caller.name
        return caller

    @staticmethod
    def _parse(message: Any, request: bytes) -> Any:
        try:
            return message.FromString(request)
        except DecodeError:
            raise RequestError(Reason.MALFORMED_REQUEST, f"malformed {message.__name__}") from None

    def _accept(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any], caller: Caller,
                entry: Entry) -> Call:
        """A Perform or PerformStream request of `caller`, validated: the executor's call.

        Raises:
            RequestError, Refusal: the request is refused.
        """
        received_at = asyncio.get_running_loop().time()
        remaining = context.time_remaining()
        rpc_deadline = received_at + remaining - rpc_deadline_margin(remaining) if remaining is not None \
            else float("inf")
        self._executor.check_room(len(request))
        parsed, task = self._validate(request, caller, entry)
        metadata = context.invocation_metadata()
        request_id, timeout_ms = agreed_id(parsed.request_id, metadata), parsed.timeout_ms or task.default_timeout_ms
        wants = Wants(parsed.priority, parsed.fairness_key,
                      parsed.queue_timeout_ms / 1e3 if parsed.queue_timeout_ms else None,
                      parsed.grace_ms / 1e3 if parsed.grace_ms else None)
        # Only a request_id needs the options again (to tell a different request under it): a digest of
        # their bytes. The raw request is all a waiting call holds.
        digest = options_digest(parsed.options) if request_id else b""
        return Call(request, task, caller, request_id, digest, timeout_ms, rpc_deadline, received_at, wants,
                    trace=TraceContext.of(metadata))

    def _validate(self, request: bytes, caller: Caller, entry: Entry) -> tuple[PerformRequestWire, Task]:
        try:
            parsed = PerformRequestWire.FromString(request)
            entry.task, entry.request_id = _loggable(parsed.task), _loggable(parsed.request_id)
        except DecodeError:
            raise RequestError(Reason.MALFORMED_REQUEST, "malformed PerformRequest") from None
        if not parsed.task:
            raise RequestError(Reason.TASK_NAME_REQUIRED, "task: a task name is required")
        tasks = self._executor.generation.tasks
        task = tasks.get(parsed.task)
        if task is None:
            names = ", ".join([name for name in tasks if caller.may_run(name)][:20])
            raise RequestError(Reason.UNKNOWN_TASK, f"unknown task {parsed.task[:100]!r}; this daemon serves: {names}")
        if not caller.may_run(task.name):
            raise RequestError(
                Reason.TASK_NOT_PERMITTED,
                f"caller {caller.name} may not run task {task.name!r} (callers.{caller.name}.tasks)",
                metadata={"caller": caller.name, "task": task.name},
            )
        if parsed.timeout_ms > task.max_timeout_ms:
            raise RequestError(
                Reason.TIMEOUT_ABOVE_MAXIMUM,
                f"timeout_ms {parsed.timeout_ms} is above the maximum of task {task.name!r} ({task.max_timeout_ms} ms)",
            )
        # The options are parsed and checked (a valid Struct, finite numbers, bounded nesting) by the task
        # process as it converts them: a 4 MiB Struct of small values costs 0.35 s to parse, the loop's.
        if len(parsed.request_id) > MAX_REQUEST_ID:
            raise RequestError(Reason.REQUEST_ID_TOO_LONG, f"request_id is longer than {MAX_REQUEST_ID} bytes")
        if not parsed.request_id.isprintable():  # it goes into log lines: no newline may forge one
            raise RequestError(
                Reason.REQUEST_ID_NOT_PRINTABLE,
                "request_id must be printable text (no newlines or control characters)",
            )
        config = self._executor.generation.config
        if not config.min_priority <= parsed.priority <= config.max_priority:
            raise RequestError(
                Reason.PRIORITY_OUT_OF_RANGE,
                f"priority {parsed.priority} is outside what this daemon allows "
                f"({config.min_priority} to {config.max_priority})",
            )
        if len(parsed.fairness_key.encode()) > MAX_FAIRNESS_KEY or not parsed.fairness_key.isprintable():
            raise RequestError(
                Reason.FAIRNESS_KEY_INVALID,
                f"fairness_key must be printable text of at most {MAX_FAIRNESS_KEY} bytes",
            )
        return parsed, task

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], error: RequestError | Refusal,
                     entry: Entry) -> None:
        # Not kept alive by the abort: its traceback holds the handler's frame, which holds it and the request
        # (MiBs) in a cycle that only the cyclic GC would free, long after a burst of refusals.
        error.__traceback__ = None
        if isinstance(error, Refusal):
            error = RequestError.of(error)
        entry.status = error.code.name
        self._metrics.rejected.labels(error.code.name, entry.caller).inc()
        await context.abort(error.code, str(error), trailing_metadata=error.trailing_metadata())


_Context = grpc.aio.ServicerContext[Any, Any]


def _unary(behaviour: Callable[[bytes, _Context], Awaitable[bytes]]) -> Callable[[bytes, _Context], Awaitable[bytes]]:
    """`behaviour`, whose refusals do not keep the request alive.

    gRPC keeps an aborted call's AbortError, whose traceback holds the handler's frames, which hold the
    call's context, which holds gRPC's record of the call, which holds the AbortError: a cycle that only
    the cyclic GC frees, long after, with the request (MiBs) in it. A burst of 4 MiB calls refused with
    QUEUE_BYTES_FULL grew the daemon by up to 1.6 x max_queued_bytes so. Clearing the frames, now done,
    leaves the cycle a few objects.
    """
    async def unary(request: bytes, context: _Context) -> bytes:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError as exc:
            del request
            traceback.clear_frames(exc.__traceback__)
            raise
    return unary


def _streaming(behaviour: Callable[[bytes, _Context], AsyncGenerator[bytes, None]],
               ) -> Callable[[bytes, _Context], AsyncIterator[bytes]]:
    """As `_unary`, for a method that answers a stream."""
    async def streaming(request: bytes, context: _Context) -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(behaviour(request, context)) as events:  # closed as the stream ends
                async for event in events:
                    yield event
        except grpc.aio.AbortError as exc:
            del request
            traceback.clear_frames(exc.__traceback__)
            raise
    return streaming


def _opened(entry: Entry, call: Call, execution_id: str, shared: bool) -> None:
    """The execution a call opened or joined, into its access record: what a caller who leaves is logged with."""
    entry.request_id, entry.shared = call.request_id or execution_id, shared


def _ended(entry: Entry, call: Call | None, performed: Performed | None) -> None:
    """What the executor says the call came to, into its access record (`performed`: None if the caller left
    before it was told: then what _opened said stands)."""
    if call is None or performed is None:
        return
    entry.request_id = call.request_id or performed.execution_id
    entry.shared = performed.shared
    entry.outcome, entry.error, entry.queue_ms, entry.run_ms = performed.ended


def agreed_id(field: str, metadata: Any) -> str:
    """A call's request id: its message's `request_id`, or the REQUEST_ID_HEADER metadata it carries so that a
    load balancer can route by it (ring_hash), or both if they agree.

    Raises:
        RequestError: they differ, or the header is no valid request id (INVALID_ARGUMENT).
    """
    header = next((value for key, value in metadata or () if key == REQUEST_ID_HEADER), None)
    if header is None:
        return field
    if isinstance(header, bytes):
        header = header.decode(errors="replace")
    if len(header) > MAX_REQUEST_ID or not header.isprintable() or not header:
        raise RequestError(Reason.REQUEST_ID_HEADER_INVALID, f"the {REQUEST_ID_HEADER} metadata must be a request "
                           f"id: printable text of 1 to {MAX_REQUEST_ID} bytes")
    if field and field != header:
        raise RequestError(Reason.REQUEST_IDS_DIFFER,
                           f"the {REQUEST_ID_HEADER} metadata ({header[:60]!r}) and the request_id field "
                           f"({field[:60]!r}) differ: send one request id, or the same in both")
    return str(header)


def _loggable(text: str) -> str:
    """`text` for the access log if it is one printable line of a sane length; else "" (a caller's id or task
    name that is refused as invalid must not write, nor forge, lines of the log)."""
    return text if len(text) <= MAX_REQUEST_ID and text.isprintable() else ""

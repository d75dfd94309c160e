"""The TaskRunner gRPC service: validates requests, admits them through the slots, runs them, logs them.

Request problems become gRPC status codes here, in `_abort`, and nowhere else; task failures
are data in an OK response.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from task_runner.server.config import Config
from task_runner.server.slots import QueueFull, Slots
from task_runner.server.supervisor import ForkServerClient, ForkServerDied, Run, Stop
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


class RequestError(Exception):
    """A request the daemon refuses: carries the gRPC status code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Task:
    name: str
    default_timeout_ms: int
    max_timeout_ms: int


class TaskRunnerService:
    """Serves Perform and ListTasks for the tasks of one fork server."""

    def __init__(self, config: Config, forkserver: ForkServerClient) -> None:
        self._config = config
        self.forkserver = forkserver
        self.slots = Slots(config.max_running, config.max_queued)
        self._tasks = {
            name: _Task(name, *config.timeouts_ms(task)) for name, task in config.all_tasks().items()
        }
        self._runs: set[Run] = set()
        self.draining = False  # new calls are refused
        self.stopping = False  # and calls still queued are refused too

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
            await _abort(context, RequestError(grpc.StatusCode.INVALID_ARGUMENT, "malformed ListTasksRequest"))
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
        try:
            parsed, task = self._validate(request)
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down; call another")
            try:
                await self.slots.acquire()
            except QueueFull:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full: {self.slots.running} tasks running and {self.slots.queued} queued; retry later",
                ) from None
            if self.stopping:
                self.slots.release()
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down; call another")
            admitted_at = loop.time()
            try:
                process = await self.forkserver.take()
            except BaseException as exc:
                self.slots.release()
                if isinstance(exc, ForkServerDied):
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry") from None
                raise
        except RequestError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort raises

        timeout_s = (parsed.timeout_ms or task.default_timeout_ms) / 1e3
        remaining = context.time_remaining()
        rpc_deadline = received_at + remaining - RPC_DEADLINE_MARGIN_S if remaining is not None else float("inf")
        run = Run(self.forkserver, process, self._config)
        request_id = parsed.request_id or uuid.uuid4().hex
        started_at = loop.time()
        execution = asyncio.ensure_future(self._execute(
            run, parsed.task, request, request_id, min(started_at + timeout_s, rpc_deadline), received_at, admitted_at,
        ))
        try:
            return await asyncio.shield(execution)
        except asyncio.CancelledError:
            run.stop(Stop.CANCELLED)  # the execution frees the slot once the process is reaped
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
        if len(parsed.request_id) > MAX_REQUEST_ID:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id is longer than {MAX_REQUEST_ID} bytes")
        return parsed, task

    async def _execute(
        self, run: Run, task: str, request: bytes, request_id: str, deadline: float,
        received_at: float, admitted_at: float,
    ) -> bytes:
        """Run the task to its answer, whatever happens to the call; log it; free the slot once it is reaped."""
        loop = asyncio.get_running_loop()
        self._runs.add(run)
        response: PerformResponse | None = None
        try:
            response, handed_at = await run.execute(request, deadline)
            response.request_id = request_id
            response.timings.queue_ms = (admitted_at - received_at) * 1e3
            response.timings.start_ms = (handed_at - admitted_at) * 1e3
            return response.SerializeToString()
        finally:
            run.reaped.add_done_callback(lambda _: self._reaped(run))
            _log_finished(request_id, task, response, loop.time() - received_at)

    def _reaped(self, run: Run) -> None:
        """The task's process is gone: its slot is free."""
        self._runs.discard(run)
        self.slots.release()

    def stop_all(self, why: Stop) -> None:
        """Have every running task killed and every queued call refused (the drain grace is over)."""
        self.stopping = True
        for run in list(self._runs):
            run.stop(why)


def _log_finished(request_id: str, task: str, response: PerformResponse | None, duration_s: float) -> None:
    if response is None:
        verdict = "lost"
    elif response.HasField("error"):
        verdict = "error=" + TaskError.Kind.Name(response.error.kind)
    else:
        verdict = f"outcome={str(response.outcome).lower()}"
    log.info("task %s finished: %s in %.1f ms", task, verdict, duration_s * 1e3, extra={"request_id": request_id})


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: RequestError) -> None:
    await context.abort(error.code, str(error))

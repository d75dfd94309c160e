"""The asyncio client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Unpack

import grpc

from task_runner.client.channel import (
    DEFAULT,
    Security,
    Target,
    _Default,
    connect,
    is_fleet,
    routed,
    rpc_timeout_s,
    traced,
)
from task_runner.client.errors import TaskRunnerError, from_grpc_error
from task_runner.client.events import Event, read_event
from task_runner.client.results import RequestFields, TaskInfo, TaskResult, build_request, read_tasks
from task_runner.client.retry import DEFAULT_RETRY, FLEET_RETRY, RetryPolicy, plan
from task_runner.client.sync import NO_ANSWER, Callback, OnProgress, _new_request_id, response_of
from task_runner.v1.task_runner_pb2 import (
    CancelRequest,
    CancelResponse,
    ListTasksRequest,
    ListTasksResponse,
    PerformEvent,
    PerformResponse,
    WatchRequest,
)
from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub

log = logging.getLogger("task_runner.client")


class AsyncClient:
    """An asyncio client; create and use it inside a running event loop. See `Client` for arguments."""

    def __init__(self, target: Target = None, security: Security | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._channel: grpc.aio.Channel
        self._channel, self._metadata = connect(target, security, aio=True)
        # A fleet's client does not rerun a call lost with its daemon on another (task_runner.client.retry).
        self._retry = FLEET_RETRY if retry is DEFAULT_RETRY and is_fleet(target) else retry
        self._stub = TaskRunnerStub(self._channel)

    async def call(
        self,
        task: str,
        timeout_ms: int | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        rpc_timeout: float | _Default | None = DEFAULT,
        retries: int = 0,
        on_progress: OnProgress | None = None,
        **fields: Unpack[RequestFields],
    ) -> TaskResult:
        """Run a task and return its answer; the same contract as `Client.call`."""
        request = build_request(task, timeout_ms, options, **fields)
        steps = plan(request, self._retry, retries, fields.get("request_id"))
        got: PerformResponse | TaskRunnerError | None = None
        metadata = traced(self._metadata)  # with the caller's trace context, if it has one
        try:
            while True:
                step = steps.send(got)
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    got = None
                    continue
                timeout = rpc_timeout_s(timeout_ms, rpc_timeout)
                sent = routed(metadata, step.request_id)  # the same id: the same daemon, behind a balancer
                try:
                    if on_progress is None:
                        got = await self._stub.Perform(step, timeout=timeout, metadata=sent)
                    else:
                        got = await self._answer_of(
                            self._stub.PerformStream(step, timeout=timeout, metadata=sent), on_progress,
                        )
                except grpc.aio.AioRpcError as exc:
                    got = from_grpc_error(exc)
                except TaskRunnerError as exc:
                    got = exc
        except StopIteration as done:
            answer: TaskResult = done.value
            return answer

    def perform(
        self, task: str, timeout_ms: int | None, options: Mapping[str, Any] | None, callback: Callback,
        *, retries: int = 0, on_progress: OnProgress | None = None, **fields: Unpack[RequestFields],
    ) -> asyncio.Task[None]:
        """Callback style: schedules the call and returns its asyncio.Task; the callback runs once, on the loop."""
        async def run() -> None:
            try:
                answer = await self.call(task, timeout_ms, options, retries=retries, on_progress=on_progress, **fields)
            except TaskRunnerError as exc:
                err: TaskRunnerError | None = exc
                outcome, result = None, None
            else:
                err, outcome, result = None, answer.outcome, answer.result
            try:
                callback(err, outcome, result)
            except Exception:
                log.exception("a perform() callback raised")

        return asyncio.ensure_future(run())

    async def stream(
        self, task: str, timeout_ms: int | None = None, options: Mapping[str, Any] | None = None, *,
        rpc_timeout: float | _Default | None = DEFAULT, **fields: Unpack[RequestFields],
    ) -> AsyncIterator[Event]:
        """Run a task and follow it; the same contract as `Client.stream`, as an async iterator."""
        request = build_request(task, timeout_ms, options, **fields)
        if not request.request_id:
            request.request_id = _new_request_id()
        metadata = routed(traced(self._metadata), request.request_id)
        async for event in self._events(self._stub.PerformStream(
                request, timeout=rpc_timeout_s(timeout_ms, rpc_timeout), metadata=metadata)):
            yield event

    async def watch(self, request_id: str, rpc_timeout: float | None = None) -> AsyncIterator[Event]:
        """Attach to the execution of `request_id`; the same contract as `Client.watch`."""
        async for event in self._events(self._stub.Watch(WatchRequest(request_id=request_id), timeout=rpc_timeout,
                                                         metadata=routed(self._metadata, request_id))):
            yield event

    async def cancel(self, request_id: str, grace_ms: int = 0, rpc_timeout: float | None = 10.0) -> bool:
        """Stop the execution of `request_id`; the same contract as `Client.cancel`."""
        try:
            response: CancelResponse = await self._stub.Cancel(
                CancelRequest(request_id=request_id, grace_ms=grace_ms), timeout=rpc_timeout,
                metadata=routed(self._metadata, request_id),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from exc
        return bool(response.was_running)

    @staticmethod
    async def _events(call: Any) -> AsyncIterator[Event]:
        try:
            async for event in call:
                yield read_event(event)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            call.cancel()  # a no-op once it ended; else the caller left early: the call is cancelled

    @staticmethod
    async def _answer_of(call: Any, on_progress: OnProgress) -> PerformResponse:
        event: PerformEvent
        async for event in call:
            if (response := response_of(event, on_progress)) is not None:
                return response
        raise TaskRunnerError(NO_ANSWER)

    async def tasks(self, rpc_timeout: float | None = 10.0) -> list[TaskInfo]:
        """The tasks the daemon serves."""
        try:
            response: ListTasksResponse = await self._stub.ListTasks(
                ListTasksRequest(), timeout=rpc_timeout, metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from exc
        return read_tasks(response)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

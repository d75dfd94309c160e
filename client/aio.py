"""The asyncio client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from task_runner.client.channel import DEFAULT, Security, Target, _Default, connect, rpc_timeout_s
from task_runner.client.errors import TaskRunnerError, from_grpc_error
from task_runner.client.results import TaskInfo, TaskResult, build_request, read_tasks
from task_runner.client.retry import DEFAULT_RETRY, RetryPolicy, plan
from task_runner.client.sync import Callback
from task_runner.v1.task_runner_pb2 import ListTasksRequest, ListTasksResponse, PerformResponse
from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub

log = logging.getLogger("task_runner.client")


class AsyncClient:
    """An asyncio client; create and use it inside a running event loop. See `Client` for arguments."""

    def __init__(self, target: Target = None, security: Security | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._channel: grpc.aio.Channel
        self._channel, self._metadata = connect(target, security, aio=True)
        self._retry = retry
        self._stub = TaskRunnerStub(self._channel)

    async def call(
        self,
        task: str,
        timeout_ms: int | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        rpc_timeout: float | _Default | None = DEFAULT,
        retries: int = 0,
        priority: int = 0,
        fairness_key: str = "",
        queue_timeout_ms: int | None = None,
    ) -> TaskResult:
        """Run a task and return its answer; the same contract as `Client.call`."""
        request = build_request(task, timeout_ms, options, request_id, priority, fairness_key, queue_timeout_ms)
        steps = plan(request, self._retry, retries, request_id)
        got: PerformResponse | TaskRunnerError | None = None
        try:
            while True:
                step = steps.send(got)
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    got = None
                    continue
                try:
                    got = await self._stub.Perform(step, timeout=rpc_timeout_s(timeout_ms, rpc_timeout),
                                                   metadata=self._metadata)
                except grpc.aio.AioRpcError as exc:
                    got = from_grpc_error(exc)
        except StopIteration as done:
            answer: TaskResult = done.value
            return answer

    def perform(
        self, task: str, timeout_ms: int | None, options: Mapping[str, Any] | None, callback: Callback,
        *, request_id: str | None = None, retries: int = 0, priority: int = 0, fairness_key: str = "",
        queue_timeout_ms: int | None = None,
    ) -> asyncio.Task[None]:
        """Callback style: schedules the call and returns its asyncio.Task; the callback runs once, on the loop."""
        async def run() -> None:
            try:
                answer = await self.call(task, timeout_ms, options, request_id=request_id, retries=retries,
                                         priority=priority, fairness_key=fairness_key,
                                         queue_timeout_ms=queue_timeout_ms)
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

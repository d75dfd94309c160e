"""The blocking client, with the original library's callback-style `perform`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from task_runner.client.channel import DEFAULT, Security, Target, _Default, connect, rpc_timeout_s
from task_runner.client.errors import TaskRunnerError, from_grpc_error
from task_runner.client.results import TaskInfo, TaskResult, build_request, read_tasks
from task_runner.client.retry import DEFAULT_RETRY, RetryPolicy, plan
from task_runner.v1.task_runner_pb2 import ListTasksRequest, PerformResponse
from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub

log = logging.getLogger("task_runner.client")

#: callback(err, outcome, result): err is a TaskRunnerError or None.
Callback = Callable[[TaskRunnerError | None, bool | None, dict[str, Any] | None], None]


class Client:
    """A blocking client of one daemon (or several, balanced). Thread-safe; close it when done.

    Args:
        target: "host:port", "unix:/path", or several "ip:port"; None: $TASK_RUNNER_TARGET or 127.0.0.1:50051.
        security: TLS files and bearer token (each also read from the environment; see `Security`).
        retry: how transport failures are retried (`NO_RETRY` to turn that off); see `RetryPolicy`.
    """

    def __init__(self, target: Target = None, security: Security | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._channel: grpc.Channel
        self._channel, self._metadata = connect(target, security, aio=False)
        self._retry = retry
        self._stub = TaskRunnerStub(self._channel)

    def call(
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
        """Run a task and return its answer.

        Args:
            task: a task name the daemon serves.
            timeout_ms: the task's time limit; None for the task's default.
            options: the task's input, JSON-like.
            request_id: an idempotency key, kept across retries; one is generated if None.
            rpc_timeout: each attempt's deadline in seconds; by default the timeout plus a
                minute's grace (none when timeout_ms is None); None for no deadline.
            retries: how many times to run the task again after a task failure (TaskFailed).
                Transport failures are retried regardless, per the client's RetryPolicy.
            priority: while every slot is busy, higher runs first (within the daemon's bounds).
            fairness_key: a tenant or caller name: keys take turns within a priority.
            queue_timeout_ms: give up (DeadlineExceeded, the task never ran) if no slot is free
                after this long; None: wait as long as the call does.

        Returns:
            The answer; `outcome` False is a deterministic failure, not an exception.

        Raises:
            TaskFailed: the task failed (TaskException, TaskTimeout, TaskCrashed, ...).
            RpcError: the request was refused or the daemon unreachable (TaskNotFound, ...).
        """
        request = build_request(task, timeout_ms, options, request_id, priority, fairness_key, queue_timeout_ms)
        steps = plan(request, self._retry, retries, request_id)
        got: PerformResponse | TaskRunnerError | None = None
        try:
            while True:
                step = steps.send(got)
                if isinstance(step, float):
                    time.sleep(step)
                    got = None
                    continue
                try:
                    got = self._stub.Perform(step, timeout=rpc_timeout_s(timeout_ms, rpc_timeout),
                                             metadata=self._metadata)
                except grpc.RpcError as exc:
                    got = from_grpc_error(exc)
        except StopIteration as done:
            answer: TaskResult = done.value
            return answer

    def perform(
        self,
        task: str,
        timeout_ms: int | None,
        options: Mapping[str, Any] | None,
        callback: Callback,
        *,
        request_id: str | None = None,
        retries: int = 0,
        priority: int = 0,
        fairness_key: str = "",
        queue_timeout_ms: int | None = None,
    ) -> None:
        """The original library's style: returns at once; `callback(err, outcome, result)` runs exactly once.

        Retries as `call` does, without blocking any thread while it waits. The callback runs on
        a gRPC (or timer) thread, or at once in this thread if the request is invalid before it
        is sent. An exception raised by the callback is logged.
        """
        once = _Once(callback)
        try:
            request = build_request(task, timeout_ms, options, request_id, priority, fairness_key, queue_timeout_ms)
            steps = plan(request, self._retry, retries, request_id)
        except TaskRunnerError as exc:
            once(exc, None, None)
            return

        def advance(got: PerformResponse | TaskRunnerError | None) -> None:
            try:
                step = steps.send(got)
            except StopIteration as finished:
                once(None, finished.value.outcome, finished.value.result)
                return
            except TaskRunnerError as exc:
                once(exc, None, None)
                return
            if isinstance(step, float):
                timer = threading.Timer(step, advance, args=(None,))
                timer.daemon = True
                timer.start()
                return
            try:
                future = self._stub.Perform.future(step, timeout=rpc_timeout_s(timeout_ms, DEFAULT),
                                                   metadata=self._metadata)
            except Exception as exc:  # e.g. the channel was closed while we waited to retry
                once(TaskRunnerError(f"the call could not be sent: {exc}"), None, None)
                return
            future.add_done_callback(done)

        def done(f: grpc.Future[PerformResponse]) -> None:
            try:
                got: PerformResponse | TaskRunnerError = f.result()
            except grpc.RpcError as exc:
                got = from_grpc_error(exc)
            advance(got)

        advance(None)

    def tasks(self, rpc_timeout: float | None = 10.0) -> list[TaskInfo]:
        """The tasks the daemon serves."""
        try:
            return read_tasks(self._stub.ListTasks(ListTasksRequest(), timeout=rpc_timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Once:
    """Calls the callback the first time only, and logs what it raises."""

    def __init__(self, callback: Callback) -> None:
        self._callback: Callback | None = callback
        self._lock = threading.Lock()

    def __call__(self, err: TaskRunnerError | None, outcome: bool | None, result: dict[str, Any] | None) -> None:
        with self._lock:
            callback, self._callback = self._callback, None
        if callback is None:
            return
        try:
            callback(err, outcome, result)
        except Exception:
            log.exception("a perform() callback raised")


_default_client: Client | None = None
_default_lock = threading.Lock()


def perform(
    task: str, timeout_ms: int | None, options: Mapping[str, Any] | None, callback: Callback,
) -> None:
    """`Client.perform` on a shared client for $TASK_RUNNER_TARGET (else 127.0.0.1:50051)."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
    _default_client.perform(task, timeout_ms, options, callback)



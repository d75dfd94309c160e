"""The blocking client, with the original library's callback-style `perform`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from task_runner.client.events import Event, Progress, read_event
from task_runner.client.results import RequestFields, TaskInfo, TaskResult, build_request, read_tasks
from task_runner.client.retry import DEFAULT_RETRY, FLEET_RETRY, RetryPolicy, plan
from task_runner.v1.task_runner_pb2 import (
    CancelRequest,
    ListTasksRequest,
    PerformEvent,
    PerformResponse,
    WatchRequest,
)
from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub

log = logging.getLogger("task_runner.client")


def _new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex

#: callback(err, outcome, result): err is a TaskRunnerError or None.
Callback = Callable[[TaskRunnerError | None, bool | None, dict[str, Any] | None], None]
#: on_progress(progress): called for each progress event of the task, as it comes.
OnProgress = Callable[[Progress], None]


def response_of(event: PerformEvent, on_progress: OnProgress) -> PerformResponse | None:
    """One event of a PerformStream followed for its answer: the response, if it is that; a progress
    event goes to `on_progress` (which may not fail the call: what it raises is logged)."""
    which = event.WhichOneof("event")
    if which == "response":
        return event.response
    if which == "progress":
        progress = read_event(event)
        assert isinstance(progress, Progress)
        try:
            on_progress(progress)
        except Exception:
            log.exception("an on_progress callable raised")
    return None


NO_ANSWER = "the daemon's stream ended without an answer"


def answer_of(events: Iterable[PerformEvent], on_progress: OnProgress) -> PerformResponse:
    """Follow a PerformStream to its response, handing each progress event to `on_progress`."""
    for event in events:
        if (response := response_of(event, on_progress)) is not None:
            return response
    raise TaskRunnerError(NO_ANSWER)


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
        # A fleet's client does not rerun a call lost with its daemon on another (task_runner.client.retry).
        self._retry = FLEET_RETRY if retry is DEFAULT_RETRY and is_fleet(target) else retry
        self._stub = TaskRunnerStub(self._channel)

    def call(
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
        """Run a task and return its answer.

        Args:
            task: a task name the daemon serves.
            timeout_ms: the task's time limit; None for the task's default.
            options: the task's input, JSON-like.
            rpc_timeout: each attempt's deadline in seconds; by default the timeout plus a
                minute's grace (none when timeout_ms is None); None for no deadline.
            retries: how many times to run the task again after a task failure (TaskFailed).
                Transport failures are retried regardless, per the client's RetryPolicy.
            on_progress: called with each Progress event the task reports, as it comes (the call
                then runs as a PerformStream).
            **fields: request_id, priority, fairness_key, queue_timeout_ms, grace_ms: see `RequestFields`.

        Returns:
            The answer; `outcome` False is a deterministic failure, not an exception.

        Raises:
            TaskFailed: the task failed (TaskException, TaskTimeout, TaskCrashed, ...).
            RpcError: the request was refused or the daemon unreachable (TaskNotFound, ...).
        """
        request = build_request(task, timeout_ms, options, **fields)
        steps = plan(request, self._retry, retries, fields.get("request_id"))
        got: PerformResponse | TaskRunnerError | None = None
        metadata = traced(self._metadata)  # with the caller's trace context, if it has one
        try:
            while True:
                step = steps.send(got)
                if isinstance(step, float):
                    time.sleep(step)
                    got = None
                    continue
                timeout = rpc_timeout_s(timeout_ms, rpc_timeout)
                sent = routed(metadata, step.request_id)  # the same id: the same daemon, behind a balancer
                try:
                    if on_progress is None:
                        got = self._stub.Perform(step, timeout=timeout, metadata=sent)
                    else:
                        got = answer_of(self._stub.PerformStream(step, timeout=timeout, metadata=sent),
                                        on_progress)
                except grpc.RpcError as exc:
                    got = from_grpc_error(exc)
                except TaskRunnerError as exc:
                    got = exc
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
        retries: int = 0,
        on_progress: OnProgress | None = None,
        **fields: Unpack[RequestFields],
    ) -> None:
        """The original library's style: returns at once; `callback(err, outcome, result)` runs exactly once.

        Retries as `call` does, without blocking any thread while it waits. The callback runs on
        a gRPC (or timer) thread, or at once in this thread if the request is invalid before it
        is sent. An exception raised by the callback is logged. With `on_progress`, the call runs
        on a thread of its own, which calls `on_progress` for each progress event, then the callback.
        """
        once = _Once(callback)
        try:
            request = build_request(task, timeout_ms, options, **fields)
            steps = plan(request, self._retry, retries, fields.get("request_id"))
        except TaskRunnerError as exc:
            once(exc, None, None)
            return
        if on_progress is not None:
            def follow() -> None:
                try:
                    answer = self.call(task, timeout_ms, options, retries=retries, on_progress=on_progress, **fields)
                except TaskRunnerError as exc:
                    once(exc, None, None)
                else:
                    once(None, answer.outcome, answer.result)
            threading.Thread(target=follow, name="task_runner.perform", daemon=True).start()
            return

        metadata = traced(self._metadata)  # the caller's trace context, taken here: retries run on other threads

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
                                                   metadata=routed(metadata, step.request_id))
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

    def stream(
        self, task: str, timeout_ms: int | None = None, options: Mapping[str, Any] | None = None, *,
        rpc_timeout: float | _Default | None = DEFAULT, **fields: Unpack[RequestFields],
    ) -> Iterator[Event]:
        """Run a task and follow it: its events as they come (Queued, Started, Progress, Output,
        Heartbeat, Gap), the last a Finished with its answer. Leaving the iteration early cancels the
        call. No retries: the events of one execution.

        Raises:
            TaskFailed: at the end, when the task failed (its events came before).
            RpcError: the request was refused or the daemon unreachable.
        """
        request = build_request(task, timeout_ms, options, **fields)
        if not request.request_id:
            request.request_id = _new_request_id()  # so that a Watch or Cancel elsewhere can name it
        yield from self._events(self._stub.PerformStream(request, timeout=rpc_timeout_s(timeout_ms, rpc_timeout),
                                                         metadata=routed(traced(self._metadata), request.request_id)))

    def watch(self, request_id: str, rpc_timeout: float | None = None) -> Iterator[Event]:
        """Attach to the execution of `request_id` (running, or finished within the idempotency window):
        its buffered events, then the rest as they come, the last a Finished. Leaving it cancels nothing.

        Raises:
            TaskFailed: at the end, when the task failed.
            TaskNotFound: no execution of that request_id.
        """
        yield from self._events(self._stub.Watch(WatchRequest(request_id=request_id), timeout=rpc_timeout,
                                                 metadata=routed(self._metadata, request_id)))

    def cancel(self, request_id: str, grace_ms: int = 0, rpc_timeout: float | None = 10.0) -> bool:
        """Stop the execution of `request_id`: told first and killed after `grace_ms` (at once if 0),
        or taken out of the queue. Returns whether it was running.

        Raises:
            TaskNotFound: no execution of that request_id runs or waits.
        """
        try:
            response = self._stub.Cancel(CancelRequest(request_id=request_id, grace_ms=grace_ms),
                                         timeout=rpc_timeout, metadata=routed(self._metadata, request_id))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        return bool(response.was_running)

    @staticmethod
    def _events(stream: Any) -> Iterator[Event]:
        try:
            for event in stream:
                yield read_event(event)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            stream.cancel()  # a no-op once it ended; else the caller left early: the call is cancelled

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



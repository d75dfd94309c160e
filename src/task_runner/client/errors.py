"""One exception tree for the client: task failures (from the response) and request/transport failures (gRPC).

    TaskRunnerError
    +-- TaskFailed           the task failed non-deterministically: may be retried
    |   +-- TaskException, TaskTimeout, TaskCrashed, TaskCancelled,
    |       TaskResultInvalid, TaskResultTooLarge, TaskLimitExceeded
    +-- RpcError             the request failed: carries the gRPC status code
        +-- TaskNotFound, InvalidRequest, Overloaded, Unavailable, DeadlineExceeded,
            Unauthenticated, PermissionDenied, Cancelled

`outcome=False` is not an error: it is an answer (a deterministic failure).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import ErrorInfo, QuotaFailure, RetryInfo
from google.rpc.status_pb2 import Status

from task_runner.v1.task_runner_pb2 import TaskError

if TYPE_CHECKING:
    from task_runner.client.results import TaskResult

STATUS_DETAILS_KEY = "grpc-status-details-bin"  # where gRPC carries a google.rpc.Status


class TaskRunnerError(Exception):
    """Base of every error the client raises."""

    retryable: ClassVar[bool] = False


class TaskFailed(TaskRunnerError):
    """The task failed non-deterministically (the response's `error`): the caller may retry."""

    kind: ClassVar[str] = "EXCEPTION"
    retryable = True

    def __init__(
        self, message: str, *, type: str = "", traceback: str = "", exit_code: int = 0, signal: int = 0,
        limit: str = "", answer: TaskResult | None = None, notice_given: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.traceback = traceback
        self.exit_code = exit_code
        self.signal = signal
        self.limit = limit  # for LIMIT_EXCEEDED: which limit
        self.answer = answer  # the whole answer: usage, output tails, timings
        self.notice_given = notice_given  # for TIMEOUT and CANCELLED: the task was told to stop first

    def __str__(self) -> str:
        return f"{self.kind}: {self.type + ': ' if self.type else ''}{self.message}"


class TaskException(TaskFailed):
    """The task raised (at import, while running, in a thread or callback), or passed an error to its callback."""

    kind = "EXCEPTION"


class TaskTimeout(TaskFailed):
    """The task outlived its timeout; its process tree was killed."""

    kind = "TIMEOUT"


class TaskCrashed(TaskFailed):
    """The task's process ended without answering; see `exit_code` and `signal`."""

    kind = "CRASHED"


class TaskCancelled(TaskFailed):
    """The task was cancelled (e.g. the daemon shut down) and its process tree killed."""

    kind = "CANCELLED"


class TaskResultInvalid(TaskFailed):
    """The task answered outside the contract: a non-bool outcome or a result that is not JSON-like."""

    kind = "RESULT_INVALID"


class TaskResultTooLarge(TaskFailed):
    """The task's result exceeded the daemon's size cap."""

    kind = "RESULT_TOO_LARGE"


class TaskStalled(TaskFailed):
    """The task sent a heartbeat, then none for longer than its heartbeat_timeout_ms; its tree was killed."""

    kind = "STALLED"


class TaskLimitExceeded(TaskFailed):
    """The task exceeded a resource limit; `limit` names it ("memory", "cpu_time", ...)."""

    kind = "LIMIT_EXCEEDED"


class TaskImportFailed(TaskFailed):
    """The task's module could not be imported when the daemon loaded its tasks: it never ran, and a retry
    fails alike until the task is fixed and the daemon reloaded (`retryable` is False; the traceback says why)."""

    kind = "IMPORT_FAILED"
    retryable = False


_BY_KIND: dict[int, type[TaskFailed]] = {
    TaskError.EXCEPTION: TaskException,
    TaskError.TIMEOUT: TaskTimeout,
    TaskError.CRASHED: TaskCrashed,
    TaskError.CANCELLED: TaskCancelled,
    TaskError.RESULT_INVALID: TaskResultInvalid,
    TaskError.RESULT_TOO_LARGE: TaskResultTooLarge,
    TaskError.LIMIT_EXCEEDED: TaskLimitExceeded,
    TaskError.STALLED: TaskStalled,
    TaskError.IMPORT_FAILED: TaskImportFailed,
}


def from_task_error(error: TaskError, answer: TaskResult | None = None) -> TaskFailed:
    """The exception for a response's TaskError."""
    cls = _BY_KIND.get(error.kind, TaskFailed)
    return cls(
        error.message, type=error.type, traceback=error.traceback, exit_code=error.exit_code,
        signal=error.signal, limit=error.limit, answer=answer, notice_given=error.notice_given,
    )


class RpcError(TaskRunnerError):
    """The call itself failed: the request was refused, or the daemon could not be reached."""

    code: ClassVar[grpc.StatusCode | None] = None

    def __init__(self, message: str, *, status: grpc.StatusCode | None = None, reason: str = "",
                 retry_delay_s: float | None = None, quota: tuple[str, ...] = (),
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.code
        self.reason = reason  # the daemon's google.rpc.ErrorInfo reason, e.g. "QUEUE_FULL"
        self.metadata = dict(metadata or {})  # and its metadata, e.g. {"caller": ..., "task": ...}
        self.retry_delay_s = retry_delay_s  # its google.rpc.RetryInfo: try again after this, it says
        self.quota = quota  # its google.rpc.QuotaFailure: the limits hit, e.g. ("tasks.scrape.max_queued",)

    def __str__(self) -> str:
        name = self.status.name if self.status else "UNKNOWN"
        return f"{name}: {self.message}"


class TaskNotFound(RpcError):
    """The daemon does not serve a task of that name."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidRequest(RpcError):
    """The request was malformed, e.g. a timeout above the task's maximum or options that are not JSON-like."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(RpcError):
    """A queue is full: the daemon's, or the task's own (`quota` names it); `retry_delay_s` says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RpcError):
    """The daemon could not be reached, or is shutting down: safe to retry, unless `may_have_run`."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True

    @property
    def may_have_run(self) -> bool:
        """Whether the call may have reached a daemon before its connection was lost: not when the daemon refused
        it itself (it says why: `reason`), nor when no connection could be made."""
        return not self.reason and not any(sign in self.message for sign in _NEVER_SENT)


# How gRPC says a call found no daemon to send it to (it was never sent).
_NEVER_SENT = ("failed to connect to all addresses", "connections to all backends failing", "Connection refused",
               "No such file or directory", "name resolution", "DNS resolution failed")


class DeadlineExceeded(RpcError):
    """The call's own deadline passed before the answer came, or its queue_timeout_ms while it still
    waited for a slot (`reason` "QUEUE_TIMEOUT": the task never ran)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(RpcError):
    """The daemon wants credentials the call did not carry."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcError):
    """The caller may not do this: e.g. run a task outside its list (`reason` "TASK_NOT_PERMITTED", `metadata`
    naming the caller and the task)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(RpcError):
    """The call was cancelled on this side."""

    code = grpc.StatusCode.CANCELLED


_BY_STATUS: dict[grpc.StatusCode, type[RpcError]] = {
    cls.code: cls
    for cls in (TaskNotFound, InvalidRequest, Overloaded, Unavailable, DeadlineExceeded, Unauthenticated,
                PermissionDenied, Cancelled)
    if cls.code is not None
}


def from_grpc_error(error: Any) -> RpcError:
    """The exception for a failed gRPC call (a grpc.RpcError or grpc.aio.AioRpcError), with the
    hints of its status details (google.rpc.ErrorInfo, RetryInfo and QuotaFailure), if it has any."""
    status = error.code()
    cls = _BY_STATUS.get(status, RpcError)
    reason, retry_delay_s, quota, metadata = "", None, [], {}
    trailer = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailer or ():
        if key != STATUS_DETAILS_KEY:
            continue
        with contextlib.suppress(DecodeError):
            for detail in Status.FromString(value).details:
                info, retry, failure = ErrorInfo(), RetryInfo(), QuotaFailure()
                if detail.Unpack(info):  # False for a detail of another type
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Unpack(retry):
                    retry_delay_s = retry.retry_delay.ToTimedelta().total_seconds()
                elif detail.Unpack(failure):
                    quota += [violation.subject for violation in failure.violations]
    return cls(error.details() or status.name, status=status, reason=reason, retry_delay_s=retry_delay_s,
               quota=tuple(quota), metadata=metadata)

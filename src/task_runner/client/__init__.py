"""The Python client of isolated-task-runner.

    from task_runner.client import Client
    with Client("127.0.0.1:50051") as client:
        answer = client.call("echo", timeout_ms=1000, options={"hello": "world"})

Also `AsyncClient` (asyncio), and the original library's callback style:
`client.perform(task, timeout_ms, options, callback)` or the module-level `perform(...)`.
"""

from task_runner.client.aio import AsyncClient
from task_runner.client.channel import DEFAULT, DEFAULT_TARGET, TARGET_ENV, Security
from task_runner.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RpcError,
    TaskCancelled,
    TaskCrashed,
    TaskException,
    TaskFailed,
    TaskImportFailed,
    TaskLimitExceeded,
    TaskNotFound,
    TaskResultInvalid,
    TaskResultTooLarge,
    TaskRunnerError,
    TaskStalled,
    TaskTimeout,
    Unauthenticated,
    Unavailable,
)
from task_runner.client.events import Event, Finished, Gap, Heartbeat, Output, Progress, Queued, Started
from task_runner.client.results import RequestFields, Sandbox, TaskInfo, TaskResult, Timings, Usage
from task_runner.client.retry import NO_RETRY, RetryPolicy
from task_runner.client.sync import Callback, Client, perform

__all__ = [
    "DEFAULT",
    "DEFAULT_TARGET",
    "NO_RETRY",
    "TARGET_ENV",
    "AsyncClient",
    "Callback",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Event",
    "Finished",
    "Gap",
    "Heartbeat",
    "InvalidRequest",
    "Output",
    "Overloaded",
    "PermissionDenied",
    "Progress",
    "Queued",
    "RequestFields",
    "RetryPolicy",
    "RpcError",
    "Sandbox",
    "Security",
    "Started",
    "TaskCancelled",
    "TaskCrashed",
    "TaskException",
    "TaskFailed",
    "TaskImportFailed",
    "TaskInfo",
    "TaskLimitExceeded",
    "TaskNotFound",
    "TaskResult",
    "TaskResultInvalid",
    "TaskResultTooLarge",
    "TaskRunnerError",
    "TaskStalled",
    "TaskTimeout",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "perform",
]

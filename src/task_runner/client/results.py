"""The plain values a call returns, and the one conversion between them and the protobuf messages.

Both the blocking and the asyncio client build requests and read responses through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from task_runner.client.errors import InvalidRequest, TaskFailed, from_task_error
from task_runner.v1.task_runner_pb2 import ListTasksResponse, PerformRequest, PerformResponse
from task_runner.values import NotJsonLike, from_struct, to_struct


@dataclass(frozen=True)
class Usage:
    """What the task's process used, and how it ended."""

    wall_ms: float = 0.0
    user_cpu_ms: float = 0.0
    system_cpu_ms: float = 0.0
    max_rss_kib: int = 0
    exit_code: int = 0
    signal: int = 0
    tmp_full: bool = False  # its private /tmp (the sandbox's tmp_mb) had no space left when it answered


@dataclass(frozen=True)
class Timings:
    """Where the time of the call went on the daemon, in milliseconds."""

    queue_ms: float = 0.0
    start_ms: float = 0.0
    run_ms: float = 0.0
    collect_ms: float = 0.0


@dataclass(frozen=True)
class TaskResult:
    """A task's answer: `outcome` True (success) or False (a deterministic failure), and its result."""

    outcome: bool
    result: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole answer (output tails decoded as UTF-8, replacing errors)."""
        return {
            "outcome": self.outcome,
            "result": self.result,
            "request_id": self.request_id,
            "usage": vars(self.usage),
            "timings": vars(self.timings),
            "stdout": self.stdout.decode(errors="replace"),
            "stderr": self.stderr.decode(errors="replace"),
            "stdout_dropped": self.stdout_dropped,
            "stderr_dropped": self.stderr_dropped,
        }


@dataclass(frozen=True)
class TaskInfo:
    """A task a daemon serves."""

    name: str
    description: str
    default_timeout_ms: int
    max_timeout_ms: int
    import_error: str = ""
    # Its admission limits (0: none): at most max_running of it at once, max_queued waiting,
    # rate_per_s starts a second on average and burst at once.
    max_running: int = 0
    max_queued: int = 0
    rate_per_s: float = 0.0
    burst: int = 0
    grace_ms: int = 0  # its notice before the deadline
    heartbeat_timeout_ms: int = 0  # 0: none
    sandbox: Sandbox | None = None  # None from a daemon older than sandboxes


@dataclass(frozen=True)
class Sandbox:
    """The sandbox a task runs in, as its daemon sets it up (README: "What a task can reach")."""

    filesystem: str  # "private" | "host"
    network: str  # "none" | "host"
    processes: str  # "private" | "host"
    syscalls: str  # "default" | "off"
    tmp_mb: int  # its private /tmp, /var/tmp and /dev/shm together (0 with filesystem = "host")
    # What its private filesystem leaves it writable and hides (real paths; none with filesystem = "host").
    writable: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (f"filesystem {self.filesystem}, network {self.network}, processes {self.processes}, "
                f"syscalls {self.syscalls}" + (f", tmp {self.tmp_mb} MiB" if self.tmp_mb else "")
                + "".join(f", {key} {' '.join(paths)}" for key, paths in (("writable", self.writable),
                                                                          ("hidden", self.hide)) if paths))


class RequestFields(TypedDict, total=False):
    """What a call asks of the daemon besides its task, timeout and options: the keyword arguments every
    form of call takes (`call`, `perform`, `stream`; blocking and asyncio), each passed on as it is to
    `build_request`. A new field of PerformRequest is added here and there, nowhere else.

    Keys:
        request_id: an idempotency key, kept across retries (one is made if None): a repeat within the
            daemon's window gets the first call's answer; Watch and Cancel name the call by it.
        priority: while every slot is busy, higher runs first (within the daemon's bounds).
        fairness_key: a tenant or user of yours: keys take turns within a priority.
        queue_timeout_ms: give up (DeadlineExceeded, the task never ran) if no slot is free after this
            long; None: wait as long as the call does.
        grace_ms: tell the task to stop this long before its deadline (None: the task's own).
    """

    request_id: str | None
    priority: int
    fairness_key: str
    queue_timeout_ms: int | None
    grace_ms: int | None


def build_request(task: str, timeout_ms: int | None, options: Mapping[str, Any] | None,
                  **fields: Unpack[RequestFields]) -> PerformRequest:
    """A PerformRequest; options must be JSON-like.

    Raises:
        InvalidRequest: for options that are not JSON-like or a timeout out of range, before any call.
    """
    priority = fields.get("priority", 0)
    queue_timeout_ms, grace_ms = fields.get("queue_timeout_ms"), fields.get("grace_ms")
    for name, value in (("timeout_ms", timeout_ms), ("queue_timeout_ms", queue_timeout_ms), ("grace_ms", grace_ms)):
        if value is not None and not 0 <= value < 2**32:
            raise InvalidRequest(f"{name} must be between 0 and 2^32-1, got {value}")
    if not -2**31 <= priority < 2**31:
        raise InvalidRequest(f"priority must be a 32-bit integer, got {priority}")
    request = PerformRequest(task=task, timeout_ms=timeout_ms or 0, request_id=fields.get("request_id") or "",
                             priority=priority, fairness_key=fields.get("fairness_key", ""),
                             queue_timeout_ms=queue_timeout_ms or 0, grace_ms=grace_ms or 0)
    try:
        to_struct(options or {}, request.options)
    except NotJsonLike as exc:
        raise InvalidRequest(f"options{exc}") from None
    return request


def read_response(response: PerformResponse) -> TaskResult:
    """The TaskResult of a response.

    Raises:
        TaskFailed: (a subclass by kind) when the task failed; `.answer` holds the rest.
    """
    usage, timings = response.usage, response.timings
    answer = TaskResult(
        outcome=response.outcome,
        result=from_struct(response.result),
        request_id=response.request_id,
        usage=Usage(usage.wall_ms, usage.user_cpu_ms, usage.system_cpu_ms, usage.max_rss_kib,
                    usage.exit_code, usage.signal, usage.tmp_full),
        timings=Timings(timings.queue_ms, timings.start_ms, timings.run_ms, timings.collect_ms),
        stdout=response.stdout.tail,
        stderr=response.stderr.tail,
        stdout_dropped=response.stdout.dropped_bytes,
        stderr_dropped=response.stderr.dropped_bytes,
    )
    if response.HasField("error"):
        raise from_task_error(response.error, answer)
    return answer


def read_tasks(response: ListTasksResponse) -> list[TaskInfo]:
    return [
        TaskInfo(t.name, t.description, t.default_timeout_ms, t.max_timeout_ms, t.import_error,
                 t.max_running, t.max_queued, t.rate_per_s, t.burst, t.grace_ms, t.heartbeat_timeout_ms,
                 Sandbox(t.sandbox.filesystem, t.sandbox.network, t.sandbox.processes, t.sandbox.syscalls,
                         t.sandbox.tmp_mb, tuple(t.sandbox.writable), tuple(t.sandbox.hide))
                 if t.HasField("sandbox") else None)
        for t in response.tasks
    ]


__all__ = ["TaskFailed", "TaskInfo", "TaskResult", "Timings", "Usage", "build_request", "read_response"]

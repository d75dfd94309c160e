"""What PerformStream and Watch deliver, as plain dataclasses: the client's view of a PerformEvent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from task_runner.client.results import TaskResult, read_response
from task_runner.v1.task_runner_pb2 import PerformEvent
from task_runner.values import from_struct


@dataclass(frozen=True)
class Event:
    """Something that happened to an execution: its number in order (1, 2, ...) and when, in ms
    after the call arrived at the daemon."""

    sequence: int
    time_ms: float


@dataclass(frozen=True)
class Queued(Event):
    """The call waits for a slot, `position` calls before it."""

    position: int = 0


@dataclass(frozen=True)
class Started(Event):
    """The task was handed to its process."""

    pid: int = 0
    caller: str = ""  # the name the daemon knows the caller by ("" where it names no callers)
    deadline_ms: float | None = None  # when its deadline falls, on the clock of time_ms (None: an older daemon)


@dataclass(frozen=True)
class Progress(Event):
    """The task says how far it is (task_runner.task.progress)."""

    fraction: float | None = None
    stage: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Output(Event):
    """A chunk of what the task printed; `dropped_bytes` of that stream before it came in no event."""

    stream: str = "stdout"  # or "stderr"
    data: bytes = b""
    dropped_bytes: int = 0


@dataclass(frozen=True)
class Heartbeat(Event):
    """The task says it is alive (task_runner.task.heartbeat)."""

    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Gap(Event):
    """`events_dropped` events before this one are not in the stream (dropped from the daemon's buffer,
    or while this stream fell behind)."""

    events_dropped: int = 0


@dataclass(frozen=True)
class Finished(Event):
    """The last event: the task's answer (a failed task raises its TaskFailed instead)."""

    result: TaskResult | None = None


def read_event(event: PerformEvent) -> Event:
    """The client's event for a PerformEvent.

    Raises:
        TaskFailed: for the response of a task that failed (`.answer` holds the rest).
    """
    at = (event.sequence, event.time_ms)
    which = event.WhichOneof("event")
    if which == "queued":
        return Queued(*at, position=event.queued.position)
    if which == "started":
        s = event.started
        return Started(*at, pid=s.pid, caller=s.caller, deadline_ms=s.deadline_ms or None)
    if which == "progress":
        p = event.progress
        return Progress(*at, fraction=p.fraction if p.HasField("fraction") else None, stage=p.stage,
                        details=from_struct(p.details))
    if which == "output":
        o = event.output
        return Output(*at, stream="stderr" if o.stream == o.STDERR else "stdout", data=o.data,
                      dropped_bytes=o.dropped_bytes)
    if which == "heartbeat":
        return Heartbeat(*at, details=from_struct(event.heartbeat.details))
    if which == "gap":
        return Gap(*at, events_dropped=event.gap.events_dropped)
    if which == "response":
        return Finished(*at, result=read_response(event.response))
    return Event(*at)  # a kind this client does not know (a newer daemon)

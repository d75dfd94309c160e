"""What a running task may ask of the runner: report progress, send heartbeats, know its time left, hear a stop.

    from task_runner import task

    def scrape(options):
        for i, url in enumerate(options["urls"]):
            if task.cancelled():  # told to stop: its grace before the deadline, a Cancel, a drain
                return False, {"done": i}
            task.progress(i / len(options["urls"]), stage="fetching", url=url)
            ...
        return True, {"done": len(options["urls"])}

Every call is cheap and never blocks or fails the task: progress and heartbeats are coalesced
(the latest of each wins) and sent by a thread of their own, at most every 50 ms; a task that
uses none of this pays nothing. Outside a task process (a unit test calling the function
directly) they do nothing, `remaining()` is infinite and `cancelled()` false.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any

from task_runner import frames
from task_runner.frames import HEARTBEAT, PROGRESS

__all__ = ["caller", "cancelled", "deadline", "heartbeat", "progress", "remaining", "request_id", "trace_context"]
SEND_INTERVAL_S = 0.05  # the most often progress and heartbeats go to the daemon


class _Channel:
    """The task process's end of its channel to the daemon, and what is waiting to be sent on it."""

    def __init__(self) -> None:
        self.fd = -1
        self.deadline = math.inf
        self.request_id = ""
        self.caller = ""
        self.traceparent = ""
        self.tracestate = ""
        self.cancelled = False
        self.write_lock = threading.Lock()  # one frame at a time: the answer must not cut into another
        self._pending: dict[bytes, bytes] = {}
        self._wake = threading.Condition()
        self._sender: threading.Thread | None = None

    def offer(self, kind: bytes, payload: bytes) -> None:
        with self._wake:
            self._pending[kind] = payload  # the latest wins
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name="task_runner.task", daemon=True)
                self._sender.start()
            self._wake.notify()

    def write(self, kind: bytes, payload: bytes) -> None:
        """Send one frame (blocking): length, kind, payload."""
        with self.write_lock:
            frames.write(self.fd, kind, payload)

    def flush(self) -> None:
        """Send what waits now (before the answer: the last progress must not be lost)."""
        with self._wake:
            pending, self._pending = self._pending, {}
        with contextlib.suppress(OSError):  # the daemon gone: the task is about to be killed anyway
            for kind in (PROGRESS, HEARTBEAT):
                if kind in pending:
                    self.write(kind, pending[kind])

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
            self.flush()
            time.sleep(SEND_INTERVAL_S)


_channel = _Channel()


def _fill_details(message: Any, details: dict[str, Any]) -> None:
    from task_runner.values import NotJsonLike, to_struct

    try:
        to_struct(details, message.details)
    except (NotJsonLike, RecursionError, TypeError, ValueError):
        message.details.Clear()
        message.details.update({"unsent": "the details were not JSON-like"})


def progress(fraction: float | None = None, stage: str = "", **details: Any) -> None:
    """Say how far the task is: `fraction` from 0 to 1 (None: unknown), `stage` in a few words, and any
    JSON-like `details`. Counts as a heartbeat too. Coalesced: the latest value wins."""
    if _channel.fd < 0:
        return
    from task_runner.v1.task_runner_pb2 import PerformEvent

    message = PerformEvent.Progress(stage=str(stage)[:1000])
    with contextlib.suppress(TypeError, ValueError):
        if fraction is not None and math.isfinite(float(fraction)):
            message.fraction = min(1.0, max(0.0, float(fraction)))
    if details:
        _fill_details(message, details)
    _channel.offer(PROGRESS, message.SerializeToString())


def heartbeat(**details: Any) -> None:
    """Say the task is alive (with JSON-like `details`, if any). Once a task has sent one, going silent
    for longer than its heartbeat_timeout_ms gets it killed as STALLED. Coalesced: the latest wins."""
    if _channel.fd < 0:
        return
    from task_runner.v1.task_runner_pb2 import PerformEvent

    message = PerformEvent.Heartbeat()
    if details:
        _fill_details(message, details)
    _channel.offer(HEARTBEAT, message.SerializeToString())


def remaining() -> float:
    """Seconds left until the task's deadline, when its process tree is killed (inf outside a task)."""
    return max(0.0, _channel.deadline - time.monotonic())


def deadline() -> float:
    """The task's deadline as an instant of time.monotonic() (inf outside a task)."""
    return _channel.deadline


def cancelled() -> bool:
    """True once the task has been told to stop: its grace before the deadline began, a Cancel with a
    grace, or the daemon's drain. It is killed at the end of the grace unless it answers first."""
    return _channel.cancelled


def request_id() -> str:
    """The call's request id (the caller's, or the one the daemon gave it); "" outside a task."""
    return _channel.request_id


def caller() -> str:
    """The name of the caller whose call this is ("default" where the daemon names no callers); "" outside
    a task. Never its token."""
    return _channel.caller


def trace_context() -> dict[str, str]:
    """The W3C trace context of the call, as a carrier for OpenTelemetry (`opentelemetry.propagate.extract(
    task.trace_context())`): {"traceparent": ..., "tracestate": ...}, the keys the call has; {} for an untraced
    call, or outside a task. The same is in the environment, as TRACEPARENT and TRACESTATE."""
    carrier = {"traceparent": _channel.traceparent, "tracestate": _channel.tracestate}
    return {key: value for key, value in carrier.items() if value}

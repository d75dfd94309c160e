"""`task-runner perform --follow` and `task-runner watch`: a task's events as they come.

On a terminal, a live progress bar (rich) shows the task's stage, how far it is, the time
elapsed, the time left before its deadline and, once it reports fractions, an estimate of the time
to completion (from its pace so far), with its output printed above the bar as it comes; otherwise
(a pipe, a log file) each event is one plain line on stderr, with the same times. The task's own
output goes to stdout and stderr as it wrote it.

The times are read on the daemon's clock (each event's time_ms, the deadline its `started` event
gives), so that `watch`, which may replay events long after they happened, says what `perform
--follow` said when they did.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from task_runner.client.events import Event, Finished, Gap, Heartbeat, Output, Progress, Queued, Started
from task_runner.client.results import TaskResult


def follow(events: Iterable[Event], timeout_s: float | None = None, out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> TaskResult | None:
    """Show the events; the answer (None if the stream ended without one). TaskFailed propagates.

    Args:
        timeout_s: the task's timeout, for a daemon whose `started` event does not say its deadline.
    """
    pace = Pace(timeout_s)
    if err.isatty():
        return _live(events, pace, out, err)
    return _plain(events, pace, out, err)


class Pace:
    """How far an execution is, from its events, on the daemon's clock."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._timeout_s = timeout_s
        self._started_ms: float | None = None
        self._deadline_ms: float | None = None
        self._fraction: float | None = None

    def see(self, event: Event) -> None:
        """Take in an event, in the order they come."""
        if isinstance(event, Started):
            self._started_ms = event.time_ms
            fallback = event.time_ms + self._timeout_s * 1e3 if self._timeout_s is not None else None
            self._deadline_ms = event.deadline_ms if event.deadline_ms is not None else fallback
        elif isinstance(event, Progress) and event.fraction is not None:
            self._fraction = event.fraction

    def left(self, event: Event) -> str:
        """The times left as of `event` (see `times`); "" before the task started."""
        if self._started_ms is None:
            return ""
        timeout_s = (self._deadline_ms - self._started_ms) / 1e3 if self._deadline_ms is not None else None
        return times((event.time_ms - self._started_ms) / 1e3, timeout_s, self._fraction)


def _write(output: Output, out: TextIO, err: TextIO) -> None:
    stream = err if output.stream == "stderr" else out
    if output.dropped_bytes:
        err.write(f"[... {output.dropped_bytes} bytes of {output.stream} not shown ...]\n")
    stream.write(output.data.decode(errors="replace"))
    stream.flush()


def times(ran_s: float, timeout_s: float | None, fraction: float | None) -> str:
    """"N s to the deadline" and, when a fraction was reported, "about M s to go" (at the pace so far)."""
    parts = [f"{max(0.0, timeout_s - ran_s):.0f} s to the deadline"] if timeout_s is not None else []
    if fraction is not None and 0 < fraction < 1 and ran_s > 0:
        parts.append(f"about {ran_s * (1 - fraction) / fraction:.0f} s to go")
    return ", ".join(parts)


def _plain(events: Iterable[Event], pace: Pace, out: TextIO, err: TextIO) -> TaskResult | None:
    for event in events:
        pace.see(event)
        line = _describe(event)
        if isinstance(event, Progress):
            left = pace.left(event)
            line = f"{line} ({left})" if left else line
        if isinstance(event, Output):
            _write(event, out, err)
        elif isinstance(event, Finished):
            return event.result
        if line:
            err.write(f"[{event.time_ms / 1e3:8.2f} s] {line}\n")
            err.flush()
    return None


def _describe(event: Event) -> str:
    if isinstance(event, Queued):
        return f"queued, {event.position} calls before it"
    if isinstance(event, Started):
        return f"started (pid {event.pid})"
    if isinstance(event, Progress):
        share = f"{event.fraction:.0%} " if event.fraction is not None else ""
        return f"progress {share}{event.stage}".rstrip()
    if isinstance(event, Heartbeat):
        return "heartbeat"
    if isinstance(event, Gap):
        return f"({event.events_dropped} events not shown)"
    return ""


def _live(events: Iterable[Event], pace: Pace, out: TextIO, err: TextIO) -> TaskResult | None:
    from rich.console import Console
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    console = Console(file=err)
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[left]}")]
    with Bar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("waiting", total=None, left="")
        for event in events:
            pace.see(event)
            left = pace.left(event)
            if isinstance(event, Output):
                bar.console.out(event.data.decode(errors="replace"), end="", highlight=False)
            elif isinstance(event, Progress):
                if event.fraction is not None:
                    bar.update(task, total=1.0, completed=event.fraction)
                bar.update(task, description=event.stage or "running", left=left)
            elif isinstance(event, Started):
                bar.update(task, description="running")
            elif isinstance(event, Queued):
                bar.update(task, description=f"queued ({event.position} before it)")
            elif isinstance(event, Gap):
                bar.console.print(f"({event.events_dropped} events not shown)", style="dim")
            elif isinstance(event, Finished):
                bar.update(task, description="done", left="")
                return event.result
    return None

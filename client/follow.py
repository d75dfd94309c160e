"""`task-runner perform --follow` and `task-runner watch`: a task's events as they come.

On a terminal, a live progress bar (rich) shows the task's stage, how far it is, the time
elapsed, the time left before its deadline and, once it reports fractions, an estimate of the time
to completion (from its pace so far), with its output printed above the bar as it comes; otherwise
(a pipe, a log file) each event is one plain line on stderr, with the same times. The task's own
output goes to stdout and stderr as it wrote it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TextIO

from task_runner.client.events import Event, Finished, Gap, Heartbeat, Output, Progress, Queued, Started
from task_runner.client.results import TaskResult


def follow(events: Iterable[Event], timeout_s: float | None, out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> TaskResult | None:
    """Show the events; the answer (None if the stream ended without one). TaskFailed propagates."""
    if err.isatty():
        return _live(events, timeout_s, out, err)
    return _plain(events, timeout_s, out, err)


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


def _plain(events: Iterable[Event], timeout_s: float | None, out: TextIO, err: TextIO) -> TaskResult | None:
    began: float | None = None
    for event in events:
        line = _describe(event)
        if isinstance(event, Started):
            began = time.monotonic()
        elif isinstance(event, Progress) and began is not None:
            left = times(time.monotonic() - began, timeout_s, event.fraction)
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


def _live(events: Iterable[Event], timeout_s: float | None, out: TextIO, err: TextIO) -> TaskResult | None:
    from rich.console import Console
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    console = Console(file=err)
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[left]}")]
    began = time.monotonic()
    with Bar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("waiting", total=None, left="")
        fraction: float | None = None
        for event in events:
            if isinstance(event, Progress) and event.fraction is not None:
                fraction = event.fraction
            left = times(time.monotonic() - began, timeout_s, fraction)
            if isinstance(event, Output):
                bar.console.out(event.data.decode(errors="replace"), end="", highlight=False)
            elif isinstance(event, Progress):
                if event.fraction is not None:
                    bar.update(task, total=1.0, completed=event.fraction)
                bar.update(task, description=event.stage or "running", left=left)
            elif isinstance(event, Started):
                began = time.monotonic()
                bar.update(task, description="running")
            elif isinstance(event, Queued):
                bar.update(task, description=f"queued ({event.position} before it)")
            elif isinstance(event, Gap):
                bar.console.print(f"({event.events_dropped} events not shown)", style="dim")
            elif isinstance(event, Finished):
                bar.update(task, description="done", left="")
                return event.result
    return None

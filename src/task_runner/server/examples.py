"""Example tasks that ship with the package, so a daemon started with no configuration serves something real.

They are registered through the `task_runner.tasks` entry points in pyproject.toml, the
same way any installed package of tasks registers its own.
"""

from __future__ import annotations

import time
from typing import Any


def echo(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Succeed at once, returning the options as {"options": ...}."""
    return True, {"options": options}


def sleep(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Sleep for options["ms"] milliseconds (default 100), then succeed."""
    ms = float(options.get("ms", 100))
    time.sleep(ms / 1e3)
    return True, {"slept_ms": ms}


def fail(options: dict[str, Any]) -> bool:
    """Raise RuntimeError(options["message"]): a non-deterministic failure."""
    raise RuntimeError(options.get("message", "this task always fails"))


def reject(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Answer outcome false, a deterministic failure, with options["reason"]."""
    return False, {"reason": options.get("reason", "nothing to do")}


def count(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Count to options["n"] (default 10), one step each options["step_ms"] (default 300), reporting progress.

    It prints a line per step and stops early, cleanly, when told to (a Cancel with a grace, its
    grace before the deadline, a drain): `task-runner perform count --follow` shows it all.
    """
    from task_runner import task

    n, step_s = int(options.get("n", 10)), float(options.get("step_ms", 300)) / 1e3
    for i in range(n):
        if task.cancelled():
            print(f"told to stop at {i} of {n}", flush=True)
            return False, {"counted": i, "stopped": True}
        task.progress(i / n, stage=f"counting {i + 1} of {n}", i=i)
        print(f"step {i + 1}", flush=True)
        time.sleep(step_s)
    task.progress(1.0, stage="done")
    return True, {"counted": n}

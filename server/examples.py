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

"""A task for the CLI's tests (tests/test_cli.py): progress reported at a pace the test knows."""

from __future__ import annotations

import time


def paced(options):
    """Work options["ms"] ms, report options["fraction"] done, then answer."""
    from task_runner import task

    time.sleep(options.get("ms", 300) / 1e3)
    task.progress(options.get("fraction", 0.1), stage="working")
    return True

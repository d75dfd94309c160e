"""The admission-at-scale phase's task, registered as `hold = "bench.scale_tasks:hold"` with `max_running = 1`.

A module of its own, as small as bench/tasks.py, because the daemon's fork server imports it.
"""

from __future__ import annotations

import time
from typing import Any


def hold(options: dict[str, Any]) -> bool:
    """Sleep `options["seconds"]` (an hour by default): the one call of its task that runs, while the
    others wait. The phase ends it by cancelling its call."""
    time.sleep(float(options.get("seconds", 3600.0)))
    return True

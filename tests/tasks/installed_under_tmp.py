"""A task of a daemon installed under /tmp (tests/test_sandbox.py): what it loads late must still be in sight."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def load_late(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Import a module of its own folder only now, and run its own interpreter."""
    import late_module  # the point: imported after the fork server's preload

    ran = subprocess.run([sys.executable, "-c", "import task_runner.task; print('ok')"], capture_output=True,
                         text=True, timeout=20)
    try:
        with open(os.path.join(os.path.dirname(late_module.__file__), "probe"), "w"):
            pass
        wrote = True
    except OSError:
        wrote = False
    return True, {"late": late_module.VALUE, "interpreter": ran.stdout.strip() or ran.stderr[-300:],
                  "prefix_seen": os.path.isdir(sys.prefix), "wrote_into_code": wrote}

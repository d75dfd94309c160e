"""The benchmark's tasks, registered in the generated daemon config as `NAME = "bench.tasks:NAME"`.

The daemon's fork server imports this module once and every task process inherits it, so it
imports only what every task needs; `stubborn` imports the rest when it runs.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, NoReturn

SAFETY_S = 300.0  # a spinner that outlives this was never killed: it gives up rather than spin for ever
SPIN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    f"end = time.monotonic() + {SAFETY_S}\n"
    "while time.monotonic() < end: pass\n"
)


def noop(options: dict[str, Any]) -> bool:
    """Do nothing and succeed."""
    return True


def sleep10(options: dict[str, Any]) -> bool:
    """Sleep 10 ms and succeed."""
    time.sleep(0.010)
    return True


def sleep100(options: dict[str, Any]) -> bool:
    """Sleep 100 ms and succeed."""
    time.sleep(0.100)
    return True


def stubborn(options: dict[str, Any]) -> NoReturn:
    """Ignore SIGTERM, start two spinning grandchildren (one in its own session), record every pid, spin."""
    import subprocess
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    plain = subprocess.Popen([sys.executable, "-c", SPIN])
    session = subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=True)
    with open(options["pidfile"], "a") as f:
        f.write(f"{os.getpid()}\n{plain.pid}\n{session.pid}\n")
        f.flush()
        os.fsync(f.fileno())
    end = time.monotonic() + SAFETY_S
    while time.monotonic() < end:
        pass
    raise RuntimeError(f"stubborn task was not killed within {SAFETY_S:.0f} s")

"""The two process-per-task baselines Perform is compared with, as calls the same client loop drives.

Both run the very same no-op, `bench.tasks.noop`, in a process of its own per task:

(a) `FreshInterpreter`: `python -c "from bench.tasks import noop; print(noop({}))"` per task,
    started with asyncio.create_subprocess_exec; the call checks that it printed True.
(b) `ProcessPerTaskPool`: concurrent.futures.ProcessPoolExecutor(max_tasks_per_child=1), so each
    task gets a new worker process. Python 3.11 refuses the "fork" start method with
    max_tasks_per_child and picks "spawn" (a fresh interpreter per worker); we ask for it explicitly.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

from bench.drivers import Outcome
from bench.procs import REPO
from bench.tasks import noop

FRESH_CODE = "from bench.tasks import noop; print(noop({}))"
CALL_TIMEOUT_S = 60.0


class FreshInterpreter:
    """(a) One fresh interpreter per task."""

    label = "fresh interpreter per task"

    def __init__(self) -> None:
        python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self._env = {**os.environ, "PYTHONPATH": python_path}

    async def __call__(self) -> Outcome:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FRESH_CODE, cwd=REPO, env=self._env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), CALL_TIMEOUT_S)
        finally:
            if process.returncode is None:  # timed out or cancelled: it must not outlive the call
                process.kill()
        if process.returncode != 0:
            return f"exit code {process.returncode}", None
        return (None if out.strip() == b"True" else f"printed {out[:40]!r}"), None

    def close(self) -> None:
        """Nothing to close: each process is reaped by its own call."""


class ProcessPerTaskPool:
    """(b) ProcessPoolExecutor(max_workers=N, max_tasks_per_child=1): a new worker process per task."""

    label = "ProcessPoolExecutor(max_tasks_per_child=1)"
    start_method = "spawn"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(self.start_method), max_tasks_per_child=1,
        )

    async def __call__(self) -> Outcome:
        answer = await asyncio.wait_for(asyncio.wrap_future(self._pool.submit(noop, {})), CALL_TIMEOUT_S)
        return (None if answer is True else f"answered {answer!r:.40}"), None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

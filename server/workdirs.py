"""A fresh, empty working directory for each task, removed once its process is reaped."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from task_runner.server.cgroups import pid_alive

log = logging.getLogger("task_runner.server")


class Workdirs:
    """Task directories live in `<base>/<daemon pid>/<task pid>-<serial>`.

    The daemon's own directory is mode 0711, so a task can reach its directory but cannot list
    its neighbours'; each task's directory is 0700 and belongs to the user tasks run as.
    """

    def __init__(self, base: str | None, owner: tuple[int, int] | None) -> None:
        # By default one base per user, so that daemons of different users never share (or squat) one.
        self.base = Path(base) if base else Path(tempfile.gettempdir()) / f"task-runner-{os.getuid()}"
        self.root = self.base / str(os.getpid())
        self._owner = owner
        self._serial = itertools.count()
        self._remover: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Create the daemon's directory, and remove what dead daemons left behind."""
        self.base.mkdir(mode=0o711, parents=True, exist_ok=True)
        if self.base.stat().st_uid != os.getuid():
            raise PermissionError(f"{self.base} belongs to another user: set workdir_base to a directory of ours")
        for entry in self.base.iterdir():
            if entry.name.isdigit() and not pid_alive(int(entry.name)):
                log.info("removing %s, left behind by a daemon that is gone", entry)
                shutil.rmtree(entry, ignore_errors=True)
        self.root.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)

    def create(self, pid: int) -> str:
        path = self.root / f"{pid}-{next(self._serial)}"
        path.mkdir(mode=0o700)
        if self._owner is not None:
            os.chown(path, *self._owner)
        return str(path)

    def discard(self, path: str) -> None:
        """Remove a task's directory, in a thread of its own: even an empty one's rmdir can take a
        while on an overlay filesystem, and a task may have left many files."""
        if self._remover is None:
            self._remover = ThreadPoolExecutor(1, thread_name_prefix="workdir-remover")
        self._remover.submit(self._remove, path)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(path, ignore_errors=True)

    def stop(self) -> None:
        if self._remover is not None:
            self._remover.shutdown(wait=True)
        shutil.rmtree(self.root, ignore_errors=True)

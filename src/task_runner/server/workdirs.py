"""A fresh, empty working directory for each task, removed once its process is reaped.

Whatever a task leaves there — a tree thousands of levels deep, directories of mode 000,
symbolic links to anywhere — is removed without following a link out of the directory and
without recursion, and no error in a removal ever stops the daemon from starting or stopping.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from task_runner.server.sandbox.cgroups import pid_alive

log = logging.getLogger("task_runner.server")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkdirError(OSError):
    """The base directory of the working directories is unsafe to use; the message says why."""


class Workdirs:
    """Task directories live in `<base>/<daemon pid>/<task pid>-<serial>`.

    The daemon's own directory is mode 0711, so a task can reach its directory but cannot list
    its neighbours'; each task's directory is 0700 and belongs to the user that task runs as.
    Every operation is relative to descriptors of the base and of the daemon's directory,
    opened once without following links, so no link planted later redirects them.
    """

    def __init__(self, base: str | None) -> None:
        # By default one base per user, so that daemons of different users never share (or squat) one.
        self.base = Path(base) if base else Path(tempfile.gettempdir()) / f"task-runner-{os.getuid()}"
        self.root = self.base / str(os.getpid())
        self._serial = itertools.count()
        self._remover: ThreadPoolExecutor | None = None
        self._base_fd = -1
        self._root_fd = -1

    def start(self) -> None:
        """Create the daemon's directory, and remove what dead daemons left behind.

        Raises:
            WorkdirError: if the base is a symbolic link, not a directory, or another user's.
            OSError: if the base or the daemon's directory cannot be created.
        """
        with contextlib.suppress(FileExistsError):
            self.base.mkdir(mode=0o711, parents=True)
        info = os.lstat(self.base)
        if stat.S_ISLNK(info.st_mode):
            raise WorkdirError(f"{self.base} is a symbolic link: set workdir_base to a real directory of ours")
        if not stat.S_ISDIR(info.st_mode):
            raise WorkdirError(f"{self.base} is not a directory")
        if info.st_uid != os.getuid():
            raise WorkdirError(f"{self.base} belongs to another user: set workdir_base to a directory of ours")
        self._base_fd = os.open(self.base, _DIR)
        for entry in os.scandir(self._base_fd):
            if entry.name.isdigit() and not pid_alive(int(entry.name)):
                log.info("removing %s, left behind by a daemon that is gone", self.base / entry.name)
                self._remove(self._base_fd, entry.name)
        name = self.root.name
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o711, dir_fd=self._base_fd)
        self._root_fd = os.open(name, _DIR, dir_fd=self._base_fd)
        os.fchmod(self._root_fd, 0o711)

    def create(self, pid: int, owner: tuple[int, int] | None) -> str:
        """Make a task process's directory, owned by `owner` (uid, gid) if given; its path.

        Raises:
            OSError: if it cannot be made (no space, no inodes, no descriptors).
        """
        name = f"{pid}-{next(self._serial)}"
        os.mkdir(name, 0o700, dir_fd=self._root_fd)
        if owner is not None:
            try:
                os.chown(name, *owner, dir_fd=self._root_fd, follow_symlinks=False)
            except OSError:
                self._remove(self._root_fd, name)
                raise
        return str(self.root / name)

    def discard(self, path: str) -> None:
        """Remove a task's directory, in a thread of its own: even an empty one's rmdir can take a
        while on an overlay filesystem, and a task may have left many files."""
        if self._remover is None:
            self._remover = ThreadPoolExecutor(1, thread_name_prefix="workdir-remover")
        self._remover.submit(self._remove, self._root_fd, os.path.basename(path))

    @staticmethod
    def _remove(parent_fd: int, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=parent_fd)  # the common case: the task left nothing
        except FileNotFoundError:
            pass
        except OSError:
            try:
                remove_tree(parent_fd, name)
            except OSError as exc:
                log.warning("cannot remove the working directory %s entirely: %s", name, exc)

    def stop(self) -> None:
        """Remove the daemon's directory; never raises."""
        if self._remover is not None:
            self._remover.shutdown(wait=True)
        if self._root_fd >= 0:
            os.close(self._root_fd)
        if self._base_fd >= 0:
            self._remove(self._base_fd, self.root.name)
            os.close(self._base_fd)
        self._root_fd = self._base_fd = -1


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove `name` in the directory `parent_fd`, with everything under it, following no link.

    Iterative, so any depth is fine, and holding two descriptors at most: it walks down one
    directory at a time and back up through "..", checking each parent is the one it came from.

    Raises:
        OSError: if something cannot be removed, or a directory moved during the walk.
    """
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    names = [name]
    fd = _open_dir(parent_fd, name)
    ids = [_identity(fd)]
    try:
        while True:
            sub = _remove_files(fd)
            if sub is not None:  # go down into it
                child = _open_dir(fd, sub)
                os.close(fd)
                fd = child
                names.append(sub)
                ids.append(_identity(fd))
                continue
            done = names.pop()  # fd is empty now: go up and remove it
            ids.pop()
            if not names:
                os.close(fd)
                fd = -1
                os.rmdir(done, dir_fd=parent_fd)
                return
            parent = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != ids[-1]:
                raise OSError(errno.ESTALE, f"the directory holding {done!r} moved while it was being removed")
            os.rmdir(done, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _open_dir(parent_fd: int, name: str) -> int:
    try:
        fd = os.open(name, _DIR, dir_fd=parent_fd)
    except PermissionError:  # mode 000 (root never gets here): it is ours, so we may open it up
        os.chmod(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, _DIR, dir_fd=parent_fd)
    if os.geteuid() != 0:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o700)  # entries of a read-only directory can be removed once it is writable
    return fd


def _remove_files(fd: int) -> str | None:
    """Remove every entry of a directory that is not a directory; the name of a subdirectory, if any."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
    return None

"""The in-process tier: a real daemon embedded in the test process (`Daemon(own_process=False)`),
run on an event loop of its own thread and talked to over real gRPC on a unix socket.

It starts in a fraction of the time a subprocess takes and lets a test look at the daemon's
own objects; it waits on the daemon's notifications (READY=1, STOPPING=1, STATUS=...), which
`Recorder` keeps in memory instead of sending them to a socket.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from task_runner.client import Client
from task_runner.server.config import load
from task_runner.server.daemon import Daemon
from task_runner.server.notify import Notifier

START_TIMEOUT_S = 30.0


class Recorder(Notifier):
    """A notifier that keeps every state it is given, for a test to wait on."""

    def __init__(self) -> None:
        super().__init__("")
        self.states: list[str] = []
        self._changed = threading.Condition()

    def notify(self, *states: str) -> None:
        with self._changed:
            self.states += states
            self._changed.notify_all()

    def wait_for(self, state: str, timeout: float = 20, after: int = 0) -> bool:
        """Wait until `state` has been notified (at index `after` or later)."""
        with self._changed:
            return self._changed.wait_for(lambda: state in self.states[after:], timeout)


def harness_dir(path: Path) -> Path:
    """The directory all of pytest's temporary directories are in (those of path, if it is in one)."""
    return next((parent for parent in path.resolve().parents if parent.name.startswith("pytest-of-")), path.parent)


def with_harness_writable(config_text: str, path: Path) -> str:
    """The config, with tasks allowed to write to the tests' temporary directories (their files are how
    tests watch tasks from outside: a private filesystem is read-only elsewhere), unless it has a
    [sandbox] table of its own."""
    if "[sandbox]" in config_text:
        return config_text
    return f'{config_text}\n[sandbox]\nwritable = ["{harness_dir(path)}"]\n'


class InProcessDaemon:
    """`with InProcessDaemon(directory, config_text) as d:` serves on `d.unix` until the block ends."""

    def __init__(self, directory: Path, config_text: str, **overrides: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config_file = directory / "config.toml"
        config_file.write_text(with_harness_writable(config_text, directory))
        self.unix = f"unix:{directory / 'daemon.sock'}"
        self.config = load(config_file, listen=[self.unix], **overrides)
        self.notifier = Recorder()
        self.daemon = Daemon(self.config, reload_config=lambda: load(config_file, listen=[self.unix], **overrides),
                             notifier=self.notifier, own_process=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="in-process daemon", daemon=True)
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__ or __exit__
            self._failure = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with self.daemon:
            self._started.set()
            await self.daemon.serve()

    def __enter__(self) -> InProcessDaemon:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or not self.notifier.wait_for("READY=1", 1):
            raise RuntimeError(f"the in-process daemon did not start: {self._failure!r}")
        return self

    def call_soon(self, function: Any, *args: Any) -> None:
        """Run `function(*args)` on the daemon's loop (its methods are not thread-safe)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(function, *args)

    def request_stop(self) -> None:
        self.call_soon(self.daemon.request_stop)

    def request_reload(self) -> None:
        self.call_soon(self.daemon.request_reload)

    def client(self, **kwargs: Any) -> Client:
        return Client(self.unix, **kwargs)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread.is_alive():
            self.request_stop()
            self._thread.join(60)
        assert not self._thread.is_alive(), "the in-process daemon did not stop within 60 s"
        if self._failure is not None and exc is None:
            raise self._failure

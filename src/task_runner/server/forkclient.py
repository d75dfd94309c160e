"""The daemon's side of the fork server: starts it, keeps spare task processes ready, kills and reaps through it.

Everything here runs on the daemon's event loop. The fork server only forks, kills and reaps,
and reports each exit with the process's resource usage; a task's options, output and result
never pass through it (see task_runner.server.run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from task_runner.server import wire
from task_runner.server.config import Config
from task_runner.server.sandbox.profile import Profile
from task_runner.server.sandboxes import Sandboxes, Secrets
from task_runner.server.uids import UidError, UidPool
from task_runner.server.wire import Stop
from task_runner.server.workdirs import Workdirs

log = logging.getLogger("task_runner.server")
FORKSERVER_START_TIMEOUT_S = 60.0
FORKSERVER_CLOSE_TIMEOUT_S = 3.0
FORK_RETRY_S = 0.1


class ForkServerDied(RuntimeError):
    """The fork server ended: running tasks are lost, no new one can start until it is back."""


class NoProcess(RuntimeError):
    """No task process could be made ready for a call (no space for its directory, no descriptors)."""


@dataclass(eq=False)
class TaskProcess:
    """A task process the fork server forked, and the daemon's ends of its channel and pipes."""

    pid: int
    serial: int  # the fork server's number for it: a pid can come back, a serial does not
    channel: socket.socket
    stdout: int
    stderr: int
    cgroup: str  # its own cgroup v2 directory, or "" where there is none
    workdir: str  # its working directory, made while it waited, removed once it is reaped ("": its private /tmp)
    uid: int  # its own uid from the pool, or wire.NO_UID
    profile: int  # its sandbox, an index in the fork server's profiles
    epoch: int = 0  # the daemon's secrets were as they are in this epoch when it set its sandbox up
    exited: asyncio.Future[wire.Exited] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def close(self) -> None:
        self.channel.close()
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class ModuleInfo:
    """What the fork server found when it imported a task's module."""

    description: str
    import_error: str


class ForkServerClient:
    """One fork server process and the task processes it forked."""

    def __init__(self, config: Config, tasks: dict[str, str], workdirs: Workdirs,
                 owner: tuple[int, int] | None = None, cgroup: str | None = None, uids: UidPool | None = None,
                 sandboxes: Sandboxes | None = None, on_secrets_moved: Callable[[], None] | None = None) -> None:
        self._config = config
        self._sandboxes = sandboxes or Sandboxes.none(tasks)
        self._uids = uids  # the one record of which uids are out: ours (asked for, or not yet gone) are ours there
        self._workdirs = workdirs
        self._cgroup = cgroup
        self._tasks = tasks
        self._loop = asyncio.get_running_loop()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setblocking(False)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "task_runner.server.forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=clean_environment(config.env_allow),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        self._owner = owner
        theirs.close()
        self.info: dict[str, ModuleInfo] = {}
        self._processes: dict[int, TaskProcess] = {}  # unreaped, spare or running
        # Spares, calls waiting for one and forks asked for, by sandbox profile. A profile keeps spares once
        # a call asked for one of it; the profile of the most tasks, from the start.
        count = len(self._sandboxes.profiles)
        self._spares: list[collections.deque[TaskProcess]] = [collections.deque() for _ in range(count)]
        self._waiters: list[collections.deque[asyncio.Future[TaskProcess]]] = [
            collections.deque() for _ in range(count)]
        self._forking = [0] * count
        self._in_demand = {self._sandboxes.busiest}
        self.sandbox_failures: dict[str, str] = {}  # the parts this machine could not set up, and why
        self.no_task_user_namespace = ""  # why a sandboxed task process cannot have a user namespace of its own
        self._backlog: collections.deque[bytes] = collections.deque()  # messages the socket had no room for
        self._failing = False  # task processes cannot be made ready (logged once until they can again)
        self._short_of_uids = False  # every task uid was busy at the last fork (logged once until not)
        # The daemon's secrets as the spares' hides cover them (none to watch without a private filesystem);
        # each time one is replaced, a new epoch: a spare of an earlier one, or forked before (stale), never serves.
        self._secrets: Secrets | None = None
        self._epoch = 0
        self._stale_forks = 0  # forks asked for before the last replacement, not yet answered (they come first)
        self._on_secrets_moved = on_secrets_moved  # asked to make new profiles (a reload) when one moved ...
        self._moved = ""  # ... and why this fork server's hides no longer cover them: it serves no call now
        self.closed = asyncio.Event()
        self.retired = False  # closed on purpose (a reload, a stop), not died

    async def start(self) -> None:
        spec = {"tasks": self._tasks, "sys_path": sys.path, "result_max_bytes": self._config.result_max_bytes,
                "cgroup": self._cgroup, "owner": self._owner,
                "profiles": [profile.to_json() for profile in self._sandboxes.profiles]}
        for packet in wire.chunks(wire.SPEC, json.dumps(spec).encode()):
            await self._loop.sock_sendall(self._sock, packet)
        try:  # importing the task modules happens now: a module that hangs must not hang the daemon
            hello = await asyncio.wait_for(self._hello(), FORKSERVER_START_TIMEOUT_S)
        except TimeoutError:
            self._process.kill()
            raise ForkServerDied(
                f"the fork server did not start within {FORKSERVER_START_TIMEOUT_S:.0f} s "
                "(does a task module hang at import?)",
            ) from None
        except ValueError:
            raise ForkServerDied(f"the fork server failed to start (exit code {self._process.wait()})") from None
        info = json.loads(hello)
        self.info = {name: ModuleInfo(**task) for name, task in info["tasks"].items()}
        self.sandbox_failures = info["sandbox_failures"]
        self.no_task_user_namespace = info["no_task_user_namespace"]
        self._sandboxes = self._sandboxes.without(set(self.sandbox_failures))  # what the fork server sets up
        if self._sandboxes.private:  # before the first fork: every spare sets its hides up after this look
            self._secrets = Secrets(self._config, self._sandboxes.hidden)
            if self._secrets.uncovered():  # moved while this fork server started
                self._secrets_replaced()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._want_spares(self._sandboxes.busiest)

    async def _hello(self) -> bytes:
        """The fork server's first message, in as many packets as its catalogue needs."""
        hello = wire.Reassembly(wire.HELLO)
        while not hello.done:
            hello.add(await self._loop.sock_recv(self._sock, wire.CHUNK + 2))
        return hello.whole

    async def take(self, task: str) -> TaskProcess:
        """A ready task process in the sandbox of `task`, forked ahead of demand if possible.

        Raises:
            ForkServerDied: the fork server is not running.
            NoProcess: none can be made ready (nor hide the daemon's secrets until new profiles serve).
        """
        if self.closed.is_set():
            raise ForkServerDied("the fork server is not running")
        profile = self._sandboxes.of_task.get(task, self._sandboxes.busiest)
        self._in_demand.add(profile)
        spares = self._spares[profile]
        while True:
            process = await self._next(profile)
            if self._hides_hold(process):
                break
            process.close()  # its sandbox was set up before a secret was replaced: it ends, another serves
        if len(spares) < (self._config.spare_processes + 1) // 2:
            self._want_spares(profile)
        # Otherwise the refill waits for a process to end: forking now would take a CPU from the
        # task just handed over, and there are spares enough for the next calls.
        return process

    async def _next(self, profile: int) -> TaskProcess:
        """A spare of `profile`, or the next one ready."""
        if self._moved:
            raise NoProcess(self._moved)
        spares = self._spares[profile]
        if spares:
            return spares.popleft()
        waiter: asyncio.Future[TaskProcess] = self._loop.create_future()
        self._waiters[profile].append(waiter)
        self._want_spares(profile)
        try:
            process = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._hand_over(waiter.result())  # handed over just as the caller left: to the next
            raise
        if self.closed.is_set():  # handed over, then closed (a reload retiring it) before we woke
            raise ForkServerDied("the fork server is not running")
        return process

    def _hides_hold(self, process: TaskProcess) -> bool:
        """The daemon's secrets are where `process`'s hides were mounted: none was replaced since (a few stats)."""
        if self._secrets is not None and self._secrets.rotated():
            self._secrets_replaced()
        return process.epoch == self._epoch and not self._moved

    def _secrets_replaced(self) -> None:
        """A secret was replaced since the spares set their sandboxes up: end them, and those being forked.

        New spares hide it afresh (the hides are mounted by path); unless its real path moved out of what the
        profiles hide: then this fork server serves no call, and new profiles are asked for (a reload).
        """
        assert self._secrets is not None
        self._epoch += 1
        self._stale_forks = sum(self._forking)
        ended = 0
        for spares in self._spares:
            while spares:
                spares.popleft().close()  # it exits at end of file; its exit report frees the rest
                ended += 1
        uncovered = self._secrets.uncovered()
        if not uncovered:
            log.info("a secret of the daemon was replaced: %d spare task processes set up before it ended, "
                     "%d being forked discarded", ended, self._stale_forks)
            self._want_all_spares()
            return
        self._moved = (f"the daemon's secrets moved ({', '.join(uncovered)} is not hidden by the sandboxes set up "
                       "for them): its tasks' sandboxes are being made anew")
        log.warning("%s; reloading, as on SIGHUP (until a reload succeeds, calls are refused)", self._moved)
        for waiters in self._waiters:
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(NoProcess(self._moved))
        if self._on_secrets_moved is not None:
            self._on_secrets_moved()

    def sandbox_of(self, task: str) -> Profile:
        """The sandbox `task`'s processes run in, as this fork server sets it up."""
        return self._sandboxes.profiles[self._sandboxes.of_task.get(task, self._sandboxes.busiest)]

    def kill(self, process: TaskProcess, why: Stop) -> None:
        if not process.exited.done():
            self._send(wire.Kill(process.pid, process.serial, why).pack(), urgent=True)

    def notice(self, process: TaskProcess) -> None:
        """Have the task process told to stop: SIGTERM to its process group."""
        if not process.exited.done():
            self._send(wire.Notice(process.pid, process.serial).pack(), urgent=True)

    def _send(self, message: bytes, urgent: bool = False) -> None:
        """Send a message to the fork server; never lose one.

        When the socket is full (the fork server is busy forking), messages wait in a backlog that
        is flushed as soon as the socket is writable; kills go to the front of it.
        """
        if self.closed.is_set():
            return  # it is gone: every process it had is dead or dying
        if not self._backlog:
            try:
                self._sock.send(message)
                return
            except BlockingIOError:
                self._loop.add_writer(self._sock.fileno(), self._flush)
            except OSError:
                return  # it is gone: its end of file comes next
        if urgent:
            self._backlog.appendleft(message)
        else:
            self._backlog.append(message)

    def _flush(self) -> None:
        while self._backlog:
            try:
                self._sock.send(self._backlog[0])
            except BlockingIOError:
                return
            except OSError:
                self._backlog.clear()
                break
            self._backlog.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def _want_spares(self, profile: int) -> None:
        waiting = sum(1 for waiter in self._waiters[profile] if not waiter.done())
        spares = self._config.spare_processes if profile in self._in_demand else 0
        wanted = spares + waiting - len(self._spares[profile]) - self._forking[profile]
        if wanted > 0 and not self.closed.is_set() and not self._moved:
            uids = []
            for _ in range(wanted):
                try:
                    uids.append(self._uids.take(self) if self._uids is not None else wire.NO_UID)
                except UidError as exc:  # every uid is busy: fewer spares for now (said once until they are not)
                    if not self._short_of_uids:
                        log.warning("%s; fewer spare task processes until some end", exc)
                    self._short_of_uids = True
                    break
            else:
                self._short_of_uids = False
            if not uids:
                self._loop.call_later(FORK_RETRY_S, self._want_spares, profile)
                return
            self._send(wire.Fork(tuple(wire.Spare(uid, profile) for uid in uids)).pack())
            self._forking[profile] += len(uids)

    def _on_readable(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._sock, 4096, 3)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                self._on_closed()
                return
            record = wire.unpack(message)
            if isinstance(record, wire.Ready):
                self._on_ready(record, fds)
            elif isinstance(record, wire.ForkFailed):
                for uid, profile in record.spares:
                    self._forking[profile] -= 1
                    self._give_back(uid)
                self._stale_forks = max(0, self._stale_forks - len(record.spares))  # (the first ones)
                log.warning("the fork server cannot fork (out of processes or descriptors?); retrying")
                self._loop.call_later(FORK_RETRY_S, self._want_all_spares)
            elif isinstance(record, wire.Released):
                for uid in record.uids:
                    self._give_back(uid)
                if self._short_of_uids:
                    self._want_all_spares()
            elif isinstance(record, wire.Exited):
                self._on_exit(record._replace(at=self._loop.time()))

    def _want_all_spares(self) -> None:
        for profile in range(len(self._spares)):
            self._want_spares(profile)

    def _on_ready(self, ready: wire.Ready, fds: list[int]) -> None:
        self._forking[ready.profile] -= 1
        pid, uid = ready.pid, ready.uid
        if self._stale_forks:  # asked for before a secret was replaced: its sandbox may show the new one
            self._stale_forks -= 1
            for fd in fds:
                os.close(fd)  # its channel among them: it exits at end of file
            self._want_spares(ready.profile)
            return
        problem = "could not receive a task process's descriptors (out of descriptors?)" if len(fds) != 3 else ""
        workdir = ""
        if not problem and not self._sandboxes.profiles[ready.profile].private_tmp:
            try:
                workdir = self._workdirs.create(pid, self._owner_of(uid))
            except OSError as exc:
                problem = f"cannot make a task's working directory: {exc.strerror or exc}"
        if problem:  # the process cannot be used: kill it, tell whoever waits, and try again shortly
            for fd in fds:
                os.close(fd)
            self._send(wire.Kill(pid, ready.serial, Stop.CANCELLED).pack(), urgent=True)
            self._spare_failed(problem, ready.profile)
            return
        if self._failing:
            self._failing = False
            log.info("task processes are ready again")
        channel = socket.socket(fileno=fds[0])
        channel.setblocking(False)
        for fd in fds[1:]:
            os.set_blocking(fd, False)
        process = TaskProcess(pid, ready.serial, channel, fds[1], fds[2], ready.cgroup, workdir, uid, ready.profile,
                              self._epoch)
        self._processes[pid] = process
        self._hand_over(process)

    def _hand_over(self, process: TaskProcess) -> None:
        """A ready process: to the first call waiting for one, else a spare, unless spares enough wait."""
        if self.closed.is_set() or self._moved:
            process.close()
            return
        waiters, spares = self._waiters[process.profile], self._spares[process.profile]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(process)
                return
        if len(spares) >= self._config.spare_processes:
            # Forked for a call that left before it came (or handed to one just as it left): surplus.
            # Closing its channel ends it (it exits at end of file) and its exit report frees the rest.
            process.close()
            return
        spares.append(process)

    def _spare_failed(self, problem: str, profile: int) -> None:
        """A task process could not be made ready: answer the calls waiting for one at once.

        They would only wait for the next one to fail the same way (a full disk, no descriptors
        left); spares are asked for again shortly, so service resumes by itself.
        """
        if not self._failing:
            self._failing = True
            log.error("a task process could not be made ready: %s; retrying every %.1f s", problem, FORK_RETRY_S)
        waiters = self._waiters[profile]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(NoProcess(f"the daemon {problem}"))
        self._loop.call_later(FORK_RETRY_S, self._want_spares, profile)

    def _owner_of(self, uid: int) -> tuple[int, int] | None:
        """Who owns the working directory of a process of that uid."""
        if self._owner is None or uid == wire.NO_UID:
            return self._owner
        return uid, self._owner[1]

    def _give_back(self, uid: int) -> None:
        if self._uids is not None:
            self._uids.give_back(uid, self)

    def leftover_uids(self) -> set[int]:
        """The uids this fork server's processes had when it ended: free again once what is left of
        them is dead (the daemon sees to it, and gives them back as ours), not before."""
        return self._uids.held_by(self) if self._uids is not None else set()

    def _on_exit(self, exit_: wire.Exited) -> None:
        # Its uid comes back with the fork server's Released, once no process of it is left.
        process = self._processes.pop(exit_.pid, None)
        if process is None:  # killed before it could be used
            return
        if process.workdir:
            self._workdirs.discard(process.workdir)
        spares = self._spares[process.profile]
        if process in spares:  # a spare died before it was used
            spares.remove(process)
            process.close()
        process.exited.set_result(exit_)
        self._want_spares(process.profile)

    def _on_closed(self) -> None:
        """The fork server is gone (or being let go): whatever it had forked is dead or dying."""
        if self.closed.is_set():
            return
        self.closed.set()
        self._loop.remove_reader(self._sock.fileno())
        if self._backlog:
            self._loop.remove_writer(self._sock.fileno())
            self._backlog.clear()
        self._sock.close()  # the fork server sees end of file: it kills what is left and exits
        now = self._loop.time()
        for process in self._processes.values():
            if process.workdir:
                self._workdirs.discard(process.workdir)
            if not process.exited.done():  # killed with the fork server (PR_SET_PDEATHSIG)
                process.exited.set_result(wire.Exited(process.pid, signal.SIGKILL, 0.0, 0.0, 0, Stop.NONE, False, now))
        self._processes.clear()
        for spares, waiters in zip(self._spares, self._waiters, strict=True):
            for process in spares:
                process.close()
            spares.clear()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ForkServerDied("the fork server ended"))
            waiters.clear()

    async def close(self) -> None:
        """End the fork server: it kills every task process it forked, then exits; or, if it does not
        within a few seconds (still importing a task module that hangs), it is killed."""
        if not self.closed.is_set():
            self.retired = True  # closed on purpose, not died
        self._on_closed()
        await asyncio.to_thread(self._wait_or_kill)

    def _wait_or_kill(self) -> None:
        try:
            self._process.wait(FORKSERVER_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the fork server did not end within %.0f s of being told to; killing it",
                        FORKSERVER_CLOSE_TIMEOUT_S)
            self._process.kill()
            self._process.wait()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def cgroup(self) -> str | None:
        """The cgroup its task processes' cgroups are made in (its generation's), if any."""
        return self._cgroup

    @property
    def exit_code(self) -> int | None:
        return self._process.poll()


def clean_environment(allow: tuple[str, ...]) -> dict[str, str]:
    """The daemon's environment, but only the variables whose names `allow` matches."""
    return {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, pattern) for pattern in allow)}

"""The daemon's lifecycle: fork server first, then gRPC; serve; on SIGTERM drain, then stop.

    start() -> serve until a signal -> drain() -> stop()

Signals only set events. The first SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new
calls get UNAVAILABLE, running tasks may finish within the drain grace, the rest are killed and
answered CANCELLED. A second one cuts the grace short. SIGHUP reloads the tasks: a new fork
server imports the task code afresh; calls in flight finish on the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import itertools
import logging
import os
import pwd
import re
import signal
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio re-exports
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from task_runner.server import logs, sandboxes, uids
from task_runner.server.callers import Callers, CredentialsError
from task_runner.server.config import Config
from task_runner.server.execution import Executor, Generation
from task_runner.server.forkclient import ForkServerClient
from task_runner.server.metrics import Metrics, readable_by_tasks
from task_runner.server.notify import Notifier
from task_runner.server.sandbox import cgroups, users
from task_runner.server.sandbox.libc import PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, prctl
from task_runner.server.security import (
    CallerAuth,
    authenticated,
    check_exposure,
    open_to_tasks,
    server_credentials,
)
from task_runner.server.service import SERVICE_NAME, TaskRunnerService
from task_runner.server.trees import children, kill_tree, reap
from task_runner.server.wire import Stop
from task_runner.server.workdirs import Workdirs

log = logging.getLogger("task_runner.server")
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
MMAP_THRESHOLD_BYTES = 64 << 10


def give_back_large_blocks() -> None:
    """Make glibc's malloc hand every block of 64 KiB or more straight back to the kernel when freed.

    A big request passes through gRPC's threads in 64 KiB blocks (two for each 64 KiB of it) and is
    copied whole before it becomes the bytes the daemon holds. glibc, once it has freed a block as
    large as a request, raises its mmap threshold to that size (its dynamic threshold): from then on
    all of these come from its arenas and stay there when freed, scattered among live blocks where
    no trim reaches. 100 queued 4 MiB calls grew the daemon by 2.2 x max_queued_bytes so; with a
    fixed threshold, by 1.2 x. Smaller blocks, all a small call's, are unaffected. Process-wide: for
    a daemon that owns its process only.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")  # the parameter's number is glibc's: another libc may differ
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return
    if not glibc:
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        log.warning("cannot set malloc's mmap threshold: big requests may leave memory behind")


class StartError(RuntimeError):
    """The daemon cannot start as configured; the message says why."""


class ListenError(StartError):
    """An address the daemon cannot listen on."""


_BIND_ERROR = re.compile(r"Error in bind for address '[^']*': ([^)]+)\)")  # in gRPC's line: the reason


def task_owner(config: Config, can_change_user: bool | None = None) -> tuple[int, int] | None:
    """The (uid, gid) tasks run as, when run_as_user is set and the daemon may give tasks another user (root, or
    CAP_SETUID and CAP_SETGID: `can_change_user`, found out if not given); else None (the daemon's own)."""
    if config.run_as_user is None:
        return None
    try:
        user = pwd.getpwnam(config.run_as_user)
        gid = grp.getgrnam(config.run_as_group).gr_gid if config.run_as_group else user.pw_gid
    except KeyError as exc:
        raise StartError(f"run_as_user/run_as_group: no such user or group: {exc}") from None
    if can_change_user is None:
        can_change_user = os.geteuid() == 0 or users.maps_its_own()
    if os.geteuid() != 0 and (user.pw_uid == os.geteuid() or not can_change_user):
        if user.pw_uid != os.geteuid():
            raise StartError(f"run_as_user = {config.run_as_user!r} needs the daemon to start as root, or with "
                             "CAP_SETUID and CAP_SETGID (the systemd unit's)")
        return None  # tasks run as the daemon's own user anyway
    return user.pw_uid, gid


class Daemon:
    """One running daemon. Build with a Config, then `await start()`, `await serve()`; or embed it:

        async with Daemon(config, own_process=False) as daemon:
            ...  # serving on daemon.addresses until the block ends (a drain, then a stop)

    The constructor does nothing but remember; `start` does the work.

    Args:
        config: the configuration.
        reload_config: builds the configuration afresh on SIGHUP or `request_reload` (None: the tasks
            are re-imported with the same configuration).
        notifier: where READY=1, STOPPING=1 and the rest go (default: $NOTIFY_SOCKET, if set).
        own_process: the daemon is the whole process, as `task-runner serve` runs it: SIGTERM, SIGINT
            and SIGHUP are its to handle, it makes itself undumpable and the subreaper of what its
            fork servers leave behind (and kills those). Embedded in another program, pass False:
            no signal handler is installed and no process-wide setting changed; call `request_stop`
            and `request_reload` instead, and use cgroups to end what a dead fork server leaves.
    """

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None,
                 notifier: Notifier | None = None, own_process: bool = True) -> None:
        self.config = config
        self.own_process = own_process
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.addresses: list[str] = []
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._force = asyncio.Event()
        self._reloading: asyncio.Future[None] | None = None
        self._reload_again = False
        self._generation = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._forkservers: set[ForkServerClient] = set()
        self._watchers: set[asyncio.Future[None]] = set()
        self._executor: Executor | None = None
        self._health = health_aio.HealthServicer()
        self._owner: tuple[int, int] | None = None
        self._cgroup: str | None = None
        self._uids: uids.UidPool | None = None
        self._workdirs = Workdirs(config.workdir_base)
        self.metrics = Metrics()

    @property
    def executor(self) -> Executor:
        """What runs the calls (and counts them), once started."""
        if self._executor is None:
            raise RuntimeError("the daemon is not started")
        return self._executor

    async def start(self) -> None:
        """Start the fork server, then gRPC, and bind every listen address."""
        loop = asyncio.get_running_loop()
        if self.own_process:
            for signum in (signal.SIGTERM, signal.SIGINT):  # before READY=1: a stop may come at once
                loop.add_signal_handler(signum, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        # Without CAP_SYS_ADMIN, with CAP_SETUID and CAP_SETGID: a user namespace of our own (sandbox.users).
        self._maps_its_own = self.own_process and users.maps_its_own()
        self._owner = task_owner(self.config, os.geteuid() == 0 or self._maps_its_own)
        check_exposure(self.config)
        if reachable := open_to_tasks(self.config, same_user=self._owner is None):
            log.warning("tasks can call this daemon on %s (no token or client certificate needed): configure "
                        "[auth]%s", ", ".join(reachable), ", or listen on a unix socket closed to others"
                        if self._owner is not None else ", or run_as_user (its tasks run as its own user)")
        if self.config.insecure and not (self.config.tls.enabled or authenticated(self.config)):
            log.warning("insecure = true: anyone who can reach %s can run tasks", ", ".join(self.config.listen))
        if self.own_process:
            # Not dumpable: processes of the same user cannot ptrace us or read our memory (the token,
            # the TLS key). exec() resets it, so the fork server and the tasks are unaffected.
            prctl(PR_SET_DUMPABLE, 0)
            # Orphans of a fork server that dies come to us, not to PID 1, so that we can end them.
            prctl(PR_SET_CHILD_SUBREAPER, 1)
            give_back_large_blocks()
        credentials = server_credentials(self.config)
        try:
            self._workdirs.start()
        except OSError as exc:
            raise StartError(f"cannot prepare the tasks' working directories: {exc}") from exc
        self._cgroup = cgroups.prepare(self.config.cgroup)
        self._uids = self._claim_uids()
        if self._maps_its_own:
            self._own_user_namespace()
        pids = self._cgroup is not None and "pids" in cgroups.controllers(self._cgroup)
        if self._owner is None and os.geteuid() == 0 and not pids:
            # RLIMIT_NPROC never binds root: only a cgroup's pids.max bounds a root task's processes.
            log.warning("tasks run as root with no cgroup pids controller: [limits] processes (%s) is not enforced; "
                        "set run_as_user, or give the daemon a cgroup v2 subtree with pids (cgroup = ...)",
                        self.config.limits.processes)
        # The fork server must exist before any gRPC thread does: it forks, and it must hold
        # nothing of ours. It is spawned as a fresh interpreter, so it is clean either way.
        self._executor = Executor(await self._start_generation(self.config), self.metrics)
        self._executor.tracer.start(self.own_process)  # after the fork server: its exporter may start threads
        service = TaskRunnerService(self._executor, self.metrics)
        executor = self._executor
        # Where every call must say who it is (its token), the interceptor turns the others away before
        # any handler; a daemon started with no credentials at all spares every call its cost.
        guard = [CallerAuth(lambda: executor.generation.callers)] if authenticated(self.config) else None
        message_cap = self.config.result_max_bytes + 2 * self.config.output_tail_bytes + (1 << 20)
        server = grpc.aio.server(
            interceptors=guard,
            options=[
                ("grpc.max_receive_message_length", self.config.max_request_bytes),
                ("grpc.max_send_message_length", message_cap),
                ("grpc.so_reuseport", 0),
                # gRPC's default (1000, then random cancellation up to 3000) would cancel a burst
                # before the daemon could answer it with RESOURCE_EXHAUSTED.
                ("grpc.server.max_pending_requests", self.config.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", self.config.max_pending_rpcs),
            ],
        )
        self._server = server
        server.add_generic_rpc_handlers((service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for address in self.config.listen:
            self.addresses.append(self._bind(server, address, credentials))
        await server.start()
        self._secure_sockets()
        if self.config.metrics_listen:
            try:
                self.metrics.listen(self.config)
            except CredentialsError as exc:
                raise StartError(str(exc)) from None
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {self.config.metrics_listen}: {exc.strerror}") from None
            if self._owner is not None and (readers := readable_by_tasks(self.config)):
                log.warning("tasks with network = \"host\" (%s) can read /metrics on %s: set metrics_token_file",
                            ", ".join(readers[:10]), self.config.metrics_listen)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s; serving tasks: %s", ", ".join(self.addresses), ", ".join(self.config.catalogue))
        self.notifier.notify("READY=1", f"STATUS=listening on {' '.join(self.addresses)}")

    def _claim_uids(self) -> uids.UidPool | None:
        """A uid of its own for each task process, where the daemon can give one (root or CAP_SETUID, run_as_user)."""
        config = self.config
        if os.geteuid() != 0 and not self._maps_its_own:
            return None
        if self._owner is None:
            if os.geteuid() != 0:
                return None
            log.warning("the daemon runs as root and run_as_user is not set: every task runs as root (with no "
                        "capability, but root's uid: with processes = \"host\" it can signal the daemon and other "
                        "tasks, and it writes what root owns where its mounts let it). Set run_as_user in production.")
            return None
        if self._owner[0] == 0:
            return None
        try:
            pool = uids.claim(config.task_uids, config.max_running + 3 * config.spare_processes)
        except uids.UidError as exc:
            raise StartError(f"task_uids: {exc}") from None
        if pool is None:
            log.warning("task_uids = \"off\": every task runs as %s, so tasks can signal each other and read each "
                        "other's files", config.run_as_user)
        return pool

    def _own_user_namespace(self) -> None:
        """Move into a user namespace that maps our user as root, run_as_user and the task uids, each to itself."""
        uid_ranges, gid_ranges = [], []
        if self._owner is not None:
            uid_ranges.append((self._owner[0], 1))
            gid_ranges.append((self._owner[1], 1))
        if self._uids is not None:
            uid_ranges.append((self._uids.first, len(self._uids)))
        with contextlib.suppress(KeyError):  # the unix sockets' owner and group (a name that is none: said later)
            if self.config.unix_socket_user:
                uid_ranges.append((pwd.getpwnam(self.config.unix_socket_user).pw_uid, 1))
            if self.config.unix_socket_group:
                gid_ranges.append((grp.getgrnam(self.config.unix_socket_group).gr_gid, 1))
        uid_map = users.extents(os.geteuid(), sorted(set(uid_ranges)))
        try:
            users.enter(uid_map, users.extents(os.getegid(), sorted(set(gid_ranges))))
        except OSError as exc:
            raise StartError(f"cannot make the daemon's user namespace (it has CAP_SETUID and CAP_SETGID but not "
                             f"CAP_SYS_ADMIN): {exc}") from None
        log.info("in a user namespace of its own (uid map %s): it sandboxes its tasks without CAP_SYS_ADMIN",
                 ", ".join(" ".join(map(str, line)) for line in uid_map))

    async def _start_generation(self, config: Config) -> Generation:
        """A fork server for `config`'s tasks, started (the tasks imported), as the generation to serve with."""
        tasks = {name: task.target for name, task in config.catalogue.items()}
        number = next(self._generation)
        try:
            callers = Callers.of(config)
            profiles, failures = sandboxes.build(config)
        except (CredentialsError, FileNotFoundError) as exc:
            raise StartError(str(exc)) from None
        cgroup = cgroups.new_generation(self._cgroup, number)
        forkserver = ForkServerClient(config, tasks, self._workdirs, self._owner, cgroup, self._uids, profiles,
                                      self.request_reload)  # (its secrets moved: new profiles must hide them)
        self._forkservers.add(forkserver)
        try:
            await forkserver.start()
            refusals = sandboxes.check(config.catalogue, {**failures, **forkserver.sandbox_failures})
            if refusals:
                raise StartError("; ".join(refusals))
        except BaseException:
            await self._end(forkserver)
            raise
        if forkserver.no_task_user_namespace and number == 1:
            log.warning("sandboxed tasks run without a user namespace of their own (%s): each sandbox holds, but a "
                        "root task is root by uid on the host (with no capability)", forkserver.no_task_user_namespace)
        for name, info in forkserver.info.items():
            if info.import_error:
                log.warning("task %s failed to import; each call will answer its error:\n%s", name, info.import_error)
        generation = Generation(number, config, forkserver, callers)
        self._background(self._replace_if_it_dies(generation))
        return generation

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        job = asyncio.ensure_future(work)
        self._watchers.add(job)  # a reference, so that it is not collected while it waits
        job.add_done_callback(self._watchers.discard)

    async def _end(self, forkserver: ForkServerClient) -> None:
        """End a fork server and everything of its generation: its process, its tasks' cgroups, and
        the orphans its tasks left (they come to the daemon, a subreaper, when it dies)."""
        await forkserver.close()
        self._forkservers.discard(forkserver)
        await asyncio.to_thread(cgroups.end_generation, forkserver.cgroup)
        ended: set[int] = set()
        while self.own_process and (orphans := children() - {f.pid for f in self._forkservers}):
            for pid in orphans - ended:
                kill_tree(pid)
            ended |= orphans
            # A short wait, then a new look: what the dead leave may come to us meanwhile, and may be
            # what another orphan waits for (the init of a pid namespace, for its task process).
            await asyncio.to_thread(reap, orphans, 0.1)
        if ended:
            log.warning("killed %d processes left behind by a fork server that ended", len(ended))
        if self._uids is not None:
            # What a dead fork server's tasks left may still run under their uids (where no cgroup
            # ended them): a uid goes back only once no process of it is left on the machine.
            leftover = forkserver.leftover_uids()
            killed = await asyncio.to_thread(uids.kill_leftovers, leftover)
            if killed:
                log.warning("killed %d processes left under task uids of a fork server that ended", killed)
            for uid in leftover:
                self._uids.give_back(uid, forkserver)

    async def _replace_if_it_dies(self, generation: Generation) -> None:
        """The fork server should never die; if it does, its tasks are answered CRASHED and a new one starts."""
        forkserver = generation.forkserver
        await forkserver.closed.wait()
        if forkserver.retired or self._stop_requested.is_set() or self._executor is None:
            return
        await self._end(forkserver)
        log.error("the fork server died (exit code %s); starting a new one", forkserver.exit_code)
        self.notifier.notify(f"STATUS=the fork server died (exit code {forkserver.exit_code}); starting a new one")
        while not self._stop_requested.is_set():
            try:
                replacement = await self._start_generation(generation.config)
            except Exception as exc:
                log.error("cannot start a fork server: %s; trying again in a second", exc)
                await asyncio.sleep(1.0)
                continue
            self._executor.swap(replacement)
            self.notifier.notify("STATUS=a new fork server serves")
            return

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> str:
        tcp = not address.startswith("unix")
        # gRPC's C core logs a failed bind in a raw line of its own: held back, and its reason said in ours.
        with logs.held_stderr() as held:
            try:
                port: int | None = (server.add_secure_port(address, credentials) if tcp and credentials is not None
                                    else server.add_insecure_port(address))
            except RuntimeError:
                port = None
        if port is None or (tcp and port == 0):
            log.debug("gRPC: %s", "".join(held).strip())
            reason = next((found[1] for line in held if (found := _BIND_ERROR.search(line))), None)
            raise ListenError(f"cannot listen on {address}: {reason or 'the address is in use or not available'}")
        logs.release(held)
        return f"{address.rpartition(':')[0]}:{port}" if tcp else address

    def _secure_sockets(self) -> None:
        """Give unix sockets the configured mode, owner and group."""
        config = self.config
        mode = int(config.unix_socket_mode, 8)
        try:
            uid = pwd.getpwnam(config.unix_socket_user).pw_uid if config.unix_socket_user else -1
            gid = grp.getgrnam(config.unix_socket_group).gr_gid if config.unix_socket_group else -1
        except KeyError as exc:
            raise ListenError(f"unix_socket_user/unix_socket_group: no such user or group: {exc}") from None
        for address in self.addresses:
            if address.startswith("unix:"):
                path = address.removeprefix("unix:").removeprefix("//")
                os.chmod(path, mode)
                if uid != -1 or gid != -1:  # (in our user namespace, if we made one, our own are root's)
                    os.chown(path, users.inside("uid", uid), users.inside("gid", gid))

    def request_stop(self) -> None:
        """A signal arrived: drain on the first, force on the second."""
        if self._stop_requested.is_set():
            log.warning("second stop signal: killing running tasks now")
            self._force.set()
        else:
            log.info("stop signal: draining (grace %.0f s); send it again to force", self.config.drain_grace_s)
            self._stop_requested.set()

    def request_reload(self) -> None:
        """SIGHUP: reload; one that arrives during a reload makes another follow it, so the code on
        disk when the last SIGHUP came is the code that serves."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.ensure_future(self.reload())

    async def reload(self) -> None:
        """Start a new fork server with the tasks afresh; the old one finishes what it runs, then ends."""
        assert self._executor is not None
        while True:
            self._reload_again = False
            self.notifier.notify("RELOADING=1", "STATUS=reloading tasks")
            try:
                config = self._reload_config() if self._reload_config else self.config
                config, kept = config.keeping(self.config)
                for line in kept:
                    log.warning("reload: %s", line)
                generation = await self._start_generation(config)
            except Exception as exc:
                log.error("reload failed, still serving the old tasks: %s", exc)
                self.notifier.notify("READY=1", "STATUS=reload failed")
            else:
                old = self._executor.swap(generation)
                self.config = config  # drain_grace_s and the rest read at a stop come from the file now
                log.info("reloaded; serving tasks: %s", ", ".join(config.catalogue))
                self.notifier.notify("READY=1", "STATUS=reloaded")
                self._background(self._retire(old))
            if not self._reload_again:
                return

    async def _retire(self, old: Generation) -> None:
        """End a generation that no longer gets new calls, once its running tasks are done."""
        assert self._executor is not None
        old.forkserver.retired = True
        await self._executor.finished(old)
        await self._end(old.forkserver)

    async def __aenter__(self) -> Daemon:
        try:
            await self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._stopped:
            return  # serve() ran to its end inside the block
        self._stop_requested.set()
        try:
            await self.drain()
        finally:
            await self.stop()

    async def serve(self) -> None:
        """Serve until a stop is requested, then drain and stop."""
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._stop_requested.wait()
            await self.drain()
        finally:
            watchdog.cancel()
            await self.stop()

    async def drain(self) -> None:
        """Refuse new calls, let running ones finish within the drain grace, then cancel the rest."""
        executor = self._executor
        assert executor is not None
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        executor.draining = True
        executor.notice_all(asyncio.get_running_loop().time() + self.config.drain_grace_s)
        await self._health.enter_graceful_shutdown()
        idle = asyncio.ensure_future(executor.wait_idle())
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait((idle, force), timeout=self.config.drain_grace_s, return_when=asyncio.FIRST_COMPLETED)
        if not idle.done():
            log.warning("drain grace over: cancelling %d running tasks", executor.admission.running)
            executor.stop_all(Stop.CANCELLED)
            await idle
        force.cancel()

    async def stop(self) -> None:
        """End everything: gRPC (after a last second for answers to go out), the fork servers and what
        their tasks left, the working directories, cgroups and uids. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._reloading is not None:
            self._reloading.cancel()  # a fork server still importing the tasks is ended below
            with contextlib.suppress(BaseException):
                await self._reloading
        metrics_closed = asyncio.ensure_future(asyncio.to_thread(self.metrics.close))  # while gRPC's grace runs
        if self._server is not None:
            await self._server.stop(grace=1.0)  # lets the last answers go out
        await metrics_closed
        for forkserver in list(self._forkservers):
            await self._end(forkserver)
        self._workdirs.stop()
        cgroups.remove_base(self._cgroup)
        if self._uids is not None:
            self._uids.close()
        self.notifier.close()
        log.info("stopped")

    async def _watchdog(self) -> None:
        if not self.own_process:
            return  # systemd watches processes: an embedded daemon is not one
        usec = int(os.environ.pop("WATCHDOG_USEC", "0") or 0)
        if not usec or not self.notifier.enabled:
            return
        while True:  # the event loop's own liveness is what the watchdog checks
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)


async def run(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run a daemon until it is told to stop; the process's exit code."""
    async with Daemon(config, reload_config) as daemon:
        await daemon.serve()
    return 0


__all__ = ["Daemon", "ListenError", "StartError", "run"]

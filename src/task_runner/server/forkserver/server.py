"""The fork server: a small process, started before gRPC, that forks one task process per task.

It is spawned as a fresh interpreter with a clean environment, so it holds none of the
daemon's memory or secrets; it imports the registered task modules once, then forks spare
task processes ahead of demand and hands the daemon their ends of the pipes. It never sees a
task's options, output or result: those travel between the daemon and the task process
directly, so a task process forked later cannot find an earlier task's data in its memory.

It is the parent of every task process, so it owns the kill and the reaping. It is a child
subreaper, and so is every task process: a task's descendants, even those that called
setsid(), stay inside the task's tree while the task lives, and fall to the fork server when
it dies, which kills every adopted process it did not fork itself, with all of its tree at once.
Nothing outlives its task.

A task process with a uid of its own is not done with when it is reaped: whatever it left may
still run under its uid. If nothing is left in its tree (we have no child we did not fork: every
process a task makes stays in its tree and falls to us), nothing of the uid is left. Otherwise the
sweeper (task_runner.server.forkserver.sweeper, a tiny child process) kills every process of the uid at
once and asks the kernel whether any is left, again until none is. Only then is the uid
Released, whatever the cgroup mode. Where each uid is in that life, the ledger alone keeps
(task_runner.server.forkserver.uidledger).

The messages it exchanges with the daemon are in task_runner.server.wire; end of file from the
daemon ends the fork server, after killing every task process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any

from task_runner.server import wire
from task_runner.server.forkserver import inits, sweeper
from task_runner.server.forkserver.uidledger import UidLedger
from task_runner.server.registry import Form, Loaded, load
from task_runner.server.sandbox import contain, mounts, probe, seccomp, users
from task_runner.server.sandbox.cgroups import TaskCgroups
from task_runner.server.sandbox.libc import (
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
    prctl,
    unshare,
)
from task_runner.server.sandbox.pids import PidNamespaces
from task_runner.server.sandbox.profile import Profile
from task_runner.server.trees import children, kill_tree

MAX_PACKET = 1 << 16
INITS_AHEAD = 4  # inits asked of the init maker before they are needed


class ForkServer:
    def __init__(self, sock: socket.socket, spec: dict[str, Any], no_user_namespace: str = "") -> None:
        self._sock = sock
        self._result_max_bytes: int = spec["result_max_bytes"]
        self._cgroups = TaskCgroups(spec.get("cgroup"))
        # The user tasks run as, when it is not ours: each task process drops to it right after
        # fork(), so that no task can signal, stop or trace the fork server or another user's processes.
        owner = spec.get("owner")
        self._owner: tuple[int, int] | None = (owner[0], owner[1]) if owner else None
        self._registry: dict[str, Loaded | str] = {}
        self._live: dict[int, int] = {}  # task processes forked here and not yet reaped -> their serial
        self._serial = 0
        self._to_fork: collections.deque[wire.Spare] = collections.deque()  # spares asked for, not yet forked
        self._kill_reason: dict[int, wire.Stop] = {}
        self._uids = UidLedger()  # the task uids we have (none for NO_UID), from their task process to their release
        self._init_of: dict[int, int] = {}  # live task process -> a pidfd of the init of its pid namespace
        self._ending: dict[int, int | None] = {}  # pidfd of an init killed after its task -> the task's uid
        self._inits: tuple[int, socket.socket] | None = None  # the init maker's pid, and our end of its socket
        self._ready_inits: collections.deque[int] = collections.deque()  # their pidfds
        self._asked_inits = 0  # asked for and not yet answered
        self._sweeper: tuple[int, socket.socket] | None = None  # its pid, and our end of its socket
        self._pid = os.getpid()
        # A task process checks it right after fork, to know whether we died before it could ask to die with us.
        self._alive = os.pidfd_open(self._pid)
        self._pid_namespaces = PidNamespaces()
        profiles = [Profile.from_json(profile) for profile in spec.get("profiles", [])] or [Profile()]
        asked = {part for profile in profiles for part in profile.parts}
        # What this machine cannot set up is left out of every profile (the daemon says so, or refuses to start).
        seccomp_program = next((profile.seccomp for profile in profiles if profile.seccomp), b"")
        self._sandbox_failures = {part: f"{no_user_namespace}: {why}" if no_user_namespace else why
                                  for part, why in probe.probe(asked, seccomp_program, seccomp.load).items()}
        self._profiles = [profile.without(set(self._sandbox_failures)) for profile in profiles]
        # A user namespace of its own for each task process that has a sandbox, or why not (the daemon says so).
        isolated = any(profile.filesystem or profile.network or profile.processes for profile in self._profiles)
        self._no_task_user_namespace = probe.probe_user_namespace() if isolated else ""
        self._user_namespaces = isolated and not self._no_task_user_namespace
        self._devnull = os.open(os.devnull, os.O_RDWR)
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._hello = self._preload(spec["tasks"])
        # Once the tasks are imported: what they and the interpreter load lazily stays in their sight.
        code = mounts.code_paths()
        self._profiles = [profile._replace(code=code) if profile.filesystem else profile for profile in self._profiles]
        self._setup = contain.Setup(self._owner, self._user_namespaces, self._alive, self._devnull, self._registry,
                                    self._result_max_bytes)

    def _preload(self, tasks: dict[str, str]) -> dict[str, Any]:
        infos: dict[str, dict[str, str]] = {}
        for name, target in tasks.items():
            try:
                loaded = load(target)
            except BaseException:
                import traceback

                self._registry[name] = target  # the task process imports it again and answers the error
                infos[name] = {"description": "", "import_error": traceback.format_exc(limit=20)[-4000:]}
            else:
                self._registry[name] = loaded
                if loaded.form is Form.ASYNC:
                    import asyncio  # noqa: F401 - preloaded so that each async task does not import it
                infos[name] = {"description": loaded.description, "import_error": ""}
        return {"pid": self._pid, "tasks": infos}

    def _hello_message(self) -> dict[str, Any]:
        return {**self._hello, "sandbox_failures": self._sandbox_failures,
                "no_task_user_namespace": self._no_task_user_namespace}

    def serve(self) -> None:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        # Not dumpable, and neither are the task processes it forks (unless they get a uid of their
        # own): tasks of its user cannot trace it, nor read or write its memory or each other's.
        prctl(PR_SET_DUMPABLE, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wakeup_w)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        gc.freeze()  # keep the collector from touching (and so copying) inherited pages in children
        for packet in wire.chunks(wire.HELLO, json.dumps(self._hello_message()).encode()):
            self._sock.send(packet)
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ, self._on_message)
        selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_sigchld)
        if self._owner is not None:
            self._sweeper = self._start_helper(sweeper.__name__, str(self._owner[1]))
            selector.register(self._sweeper[1], selectors.EVENT_READ, self._on_swept)
        if any(profile.processes for profile in self._profiles):
            self._inits = self._start_helper(inits.__name__)
            selector.register(self._inits[1], selectors.EVENT_READ, self._on_inits)
            self._ask_inits()
        try:
            users.lock_privileges()  # after the helpers' exec: whatever we fork from now on inherits it
        except OSError as exc:  # (no CAP_SETPCAP: a unit that keeps fewer capabilities than it should)
            print(f"task-runner fork server: cannot empty the tasks' bounding set ({exc}): a root task could regain "
                  "capabilities by running a program", file=sys.stderr, flush=True)
        try:
            while True:
                # Forks are done one per turn, so that kills and exits that arrive during a
                # storm of forks wait for one fork at most, never for the whole storm.
                sweep_at = self._uids.sweep_at
                timeout = None if sweep_at is None else max(0.0, sweep_at - time.monotonic())
                for key, _ in selector.select(0 if self._to_fork else timeout):
                    key.data()
                if self._uids.sweep_at is not None and time.monotonic() >= self._uids.sweep_at:
                    self._ask_sweeper()
                if self._to_fork:
                    self._fork_one()
        except EOFError:
            pass
        finally:
            self._shutdown()

    def _on_message(self) -> None:
        """Handle every message waiting: kills at once, forks counted for the loop to do."""
        while True:
            try:
                message = self._sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (ConnectionResetError, BrokenPipeError):
                message = b""
            if not message:
                raise EOFError
            record = wire.unpack(message)
            if isinstance(record, wire.Fork):
                self._to_fork.extend(record.spares)
            elif isinstance(record, wire.Kill) and self._live.get(record.pid) == record.serial:
                self._kill_reason.setdefault(record.pid, record.why)
                kill_tree(record.pid, self._cgroups)
            elif isinstance(record, wire.Notice) and self._live.get(record.pid) == record.serial:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(record.pid, signal.SIGTERM)

    def _fork_one(self) -> None:
        try:
            self._spawn(self._to_fork[0])
        except OSError:  # out of processes or descriptors: say so; the daemon asks again later
            self._send(wire.ForkFailed(tuple(self._to_fork)).pack())
            self._to_fork.clear()
        else:
            self._to_fork.popleft()

    def _send(self, message: bytes, fds: list[int] | None = None) -> None:
        """Send to the daemon; its socket gone means it is gone: the same as end of file."""
        try:
            if fds:
                socket.send_fds(self._sock, [message], fds)
            else:
                self._sock.send(message)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EOFError from exc

    def _spawn(self, spare: wire.Spare) -> None:
        uid, profile = spare
        init = self._take_init() if self._profiles[profile].processes else None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipes: list[int] = []
        try:
            pipes += os.pipe()
            pipes += os.pipe()
            pid = self._pid_namespaces.fork(init)
        except OSError:
            for fd in pipes:
                os.close(fd)
            parent_end.close()
            child_end.close()
            if init is not None:
                self._end_init(init, None)
            raise
        out_r, out_w, err_r, err_w = pipes
        if pid == 0:
            try:
                contain.become_task_process(self._setup, child_end.fileno(), out_w, err_w, uid, self._profiles[profile],
                                            self._serial + 1)
            finally:
                os._exit(70)
        if uid != wire.NO_UID:
            # A uid we have already (the daemon's pool broken) ends us: our shutdown kills this child with the rest.
            self._uids.give(uid, pid)
        self._serial += 1
        self._live[pid] = self._serial
        cgroup = self._cgroups.add(pid) or ""
        if init is not None:
            self._init_of[pid] = init
        for fd in (child_end.fileno(), out_w, err_w):
            os.close(fd)
        child_end.detach()
        try:
            self._send(wire.Ready(pid, self._serial, uid, profile, cgroup).pack(), [parent_end.fileno(), out_r, err_r])
        finally:
            parent_end.close()
            os.close(out_r)
            os.close(err_r)

    def _on_sigchld(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wakeup_r, 4096)
        reaped = False
        freed: list[int] = []  # uids of the task processes reaped now
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self._helpers():
                raise EOFError  # neither ends on its own: without the sweeper no uid could come back, without
                                # the init maker no sandboxed task could start; start afresh
            reaped = True
            if pid in self._live:
                del self._live[pid]
                oom = self._cgroups.oom_killed(pid)
                self._cgroups.release(pid)
                why = self._kill_reason.pop(pid, wire.Stop.NONE)
                self._send(wire.Exited(pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss, why, oom).pack())
                uid = self._uids.reaped(pid)
                init = self._init_of.pop(pid, None)
                if init is not None:  # its uid is free once the whole namespace is gone
                    self._end_init(init, uid)
                elif uid is not None:
                    freed.append(uid)
        if reaped:
            if self._kill_orphans():
                # Something a task left lives (or did until now): the sweeper sees to these uids.
                for uid in freed:
                    self._uids.sweep(uid)
            elif freed:
                # Nothing of theirs is left: every process a task makes stays in its tree (it is a
                # subreaper) and falls to us when it dies, and we have no child it could have left.
                self._release(freed)
            self._cgroups.remove_emptied()
            self._ask_sweeper()

    def _kill_orphans(self) -> bool:
        """Kill what finished tasks left; whether there was any."""
        # A process we did not fork is the remains of a finished task: its task process was a
        # subreaper, so its descendants came to us only when it died. Kill each with its whole
        # tree at once: what is left comes to us in turn and is reaped.
        orphans = children() - self._live.keys() - self._helpers()
        for pid in orphans:
            kill_tree(pid)
        return bool(orphans)

    def _helpers(self) -> set[int]:
        """The pids of the sweeper and the init maker, those that run."""
        return {helper[0] for helper in (self._sweeper, self._inits) if helper is not None}

    def _start_helper(self, module: str, *args: str) -> tuple[int, socket.socket]:
        """Spawn the sweeper or the init maker: a fresh interpreter, so that its forks copy a few MiB, not
        our task modules; its pid, and our end of its socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        argv = [sys.executable, "-m", module, str(theirs.fileno()), *args]
        pid = os.fork()
        if pid == 0:  # this process has no thread but the main one: fork, then exec at once
            try:
                os.set_inheritable(theirs.fileno(), True)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(70)
        theirs.close()
        return pid, ours

    def _ask_inits(self) -> None:
        """Keep INITS_AHEAD inits asked for or ready."""
        assert self._inits is not None
        while len(self._ready_inits) + self._asked_inits < INITS_AHEAD:
            try:
                self._inits[1].send(b"\0", socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise EOFError from exc  # the init maker is gone (see _on_sigchld)
            self._asked_inits += 1

    def _on_inits(self, block: bool = False) -> None:
        """The init maker's answers: pidfds of inits, ready for spares."""
        assert self._inits is not None
        while self._asked_inits:
            try:
                message, fds, _, _ = socket.recv_fds(self._inits[1], 1, 1, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not message:
                raise EOFError
            self._asked_inits -= 1
            self._ready_inits.extend(fds)
            block = False

    def _take_init(self) -> int:
        """A pidfd of a new init, for a spare with a pid namespace of its own (waiting for one if none is ready).

        Raises:
            OSError: the init maker could not make one (out of processes): the spare is not forked.
        """
        if not self._ready_inits:
            self._ask_inits()
            self._on_inits(block=True)
        if not self._ready_inits:
            raise OSError(errno.EAGAIN, "the init maker could not make an init")
        init = self._ready_inits.popleft()
        self._ask_inits()
        return init

    def _end_init(self, init: int, uid: int | None) -> None:
        """Kill the init of a reaped task's pid namespace: the kernel kills what the task left there. Once
        its pidfd is readable, nothing of the namespace is left, and the task's uid is Released."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
        self._ending[init] = uid
        self._selector.register(init, selectors.EVENT_READ, lambda: self._on_init_ended(init))

    def _on_init_ended(self, init: int) -> None:
        self._selector.unregister(init)
        os.close(init)
        uid = self._ending.pop(init)
        if uid is not None:
            self._release([uid])
        self._cgroups.remove_emptied()

    def _release(self, uids: list[int]) -> None:
        """Nothing of these reaped task processes' uids is left: they go back to the daemon."""
        for uid in uids:
            self._uids.release(uid)
        self._send(wire.Released(tuple(uids)).pack())

    def _ask_sweeper(self) -> None:
        """Ask the sweeper about each uid whose processes may live and whose sweep is due."""
        if self._sweeper is None:
            return
        for uid in self._uids.due(time.monotonic()):
            try:
                self._sweeper[1].send(sweeper.REQUEST.pack(uid), socket.MSG_DONTWAIT)
            except BlockingIOError:  # it has enough to do: the rest are asked as it answers
                return
            self._uids.asked(uid)

    def _on_swept(self) -> None:
        """The sweeper's answers: CLEAN uids are Released; the others are swept again (soon, then later)."""
        assert self._sweeper is not None
        released: list[int] = []
        while True:
            try:
                answer = self._sweeper[1].recv(sweeper.ANSWER.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not answer:
                raise EOFError  # the sweeper is gone (see _on_sigchld)
            uid, result = sweeper.ANSWER.unpack(answer)
            if self._uids.swept(uid, result == sweeper.CLEAN, time.monotonic()):
                released.append(uid)
        if released:
            self._send(wire.Released(tuple(released)).pack())
        self._ask_sweeper()

    def _shutdown(self) -> None:
        for helper in (self._sweeper, self._inits):
            if helper is not None:
                helper[1].close()  # end of file ends it (and the init maker's inits); it is reaped below
        for pid in list(self._live):
            kill_tree(pid, self._cgroups)
        while True:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self._cgroups.release(pid)
            self._kill_orphans()
        self._cgroups.close()


def main() -> None:
    """Entry point: `python -m task_runner.server.forkserver FD`, FD a SOCK_SEQPACKET socket."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    message = wire.Reassembly(wire.SPEC)
    while not message.done:
        message.add(sock.recv(wire.CHUNK + 2))
    spec = json.loads(message.whole)
    sys.path[:] = spec["sys_path"]
    # An ordinary user's fork server is root in a user namespace of its own, so that its tasks get the whole
    # sandbox, as bubblewrap gives it, all under this user on the host (a root one needs none).
    # A daemon with CAP_SETUID but not CAP_SYS_ADMIN is already root in one (task_runner.server.sandbox.users).
    no_user_namespace = users.own_user_namespace() if os.geteuid() != 0 else ""
    _die_with_the_daemon(sock)  # after a user namespace of our own, which would undo it
    if not users.in_the_hosts_user_namespace():  # an ordinary user's, or the daemon's own (users.enter)
        _in_a_pid_namespace_of_our_own()
    ForkServer(sock, spec, no_user_namespace).serve()


def _die_with_the_daemon(sock: socket.socket) -> None:
    """End with the daemon, even while the task modules import or the probe runs, before we read our socket's end
    (afterwards its end of file ends us, and our task processes with us)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":  # it died before prctl took effect
            os._exit(0)
    except BlockingIOError:
        pass


def _in_a_pid_namespace_of_our_own() -> None:
    """Go on in a pid namespace our user namespace owns, as its pid 1; this process only waits for that one.

    Forking a task process into its own pid namespace takes a setns there and back again, and back means into
    our pid namespace, which needs CAP_SYS_ADMIN over its owner: for the host's, only a root daemon has it.
    """
    try:
        unshare(CLONE_NEWPID)
    except OSError:
        return  # the probe then says why `processes` cannot be set up
    alive = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # with the daemon's child, which it ends by our socket's end
        if select.select([alive], [], [], 0)[0]:
            os._exit(0)
        os.close(alive)
        return
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the daemon decides, by closing the socket the other holds
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()

"""The task process: forked by the fork server, it waits for one task, runs it, answers once and exits.

The channel to the daemon is fd 3, a stream socket carrying length-prefixed frames: one
PerformRequest in; out, first the runner's verdict on the options (the task starts, or they are
invalid), then one PerformResponse (outcome, result, error only). Whatever answers
first wins: the task's return, its callback, or an uncaught exception in any thread or asyncio
callback; the process then ends itself at once with `os._exit(0)`. A process that ends
without answering is reported by the daemon as CRASHED, with its exit code or signal.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from google.protobuf.message import DecodeError

import task_runner.task as task_api
from task_runner import frames
from task_runner.frames import error_response as _error
from task_runner.server import registry
from task_runner.server.registry import Form, Loaded, load
from task_runner.v1.task_runner_pb2 import PerformRequest, PerformResponse, TaskError
from task_runner.values import NotJsonLike, from_struct, struct_digest, to_struct

if TYPE_CHECKING:
    import asyncio

CHANNEL_FD = 3
# Frames of this runner, the loader and the machinery they call: left out of a task's traceback.
_RUNNER_FILES = frozenset({
    __file__, registry.__file__, importlib.__file__,
    "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
})
_RUNNER_DIRS = (os.path.join(os.path.dirname(os.__file__), "asyncio") + os.sep,)
Kind = TaskError.Kind
_limited: set[str] = set()  # the limits this process runs under (task_runner.server.sandbox.contain sets them)
_private_tmp = False  # its /tmp is the sandbox's own tmpfs (of tmp_mb)


def _tmp_full() -> bool:
    """Its private /tmp has no space left (nor inodes)."""
    if not _private_tmp:
        return False
    try:
        info = os.statvfs("/tmp")
    except OSError:
        return False
    return info.f_bavail == 0 or info.f_favail == 0


def _limit_hit(exc: BaseException) -> str | None:
    """Which limit an exception shows was hit, if one was set."""
    if isinstance(exc, MemoryError) and "memory" in _limited:
        return "memory"
    if isinstance(exc, RuntimeError) and str(exc).startswith("can't start new thread"):
        # pthread_create fails with EAGAIN for the process limit and for want of address space alike.
        return next((name for name in ("processes", "memory") if name in _limited), None)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOMEM and "memory" in _limited:
            return "memory"
        if exc.errno == errno.EMFILE and "open_files" in _limited:
            return "open_files"
        if exc.errno == errno.EAGAIN and "processes" in _limited:
            return "processes"
        if exc.errno == errno.EFBIG and "file_size" in _limited:
            return "file_size"
        if exc.errno == errno.ENOSPC and _tmp_full():
            return "tmp_mb"
    return None


class _Answer:
    """The one answer of this process: the first caller of `give` wins and ends the process."""

    def __init__(self, result_max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._result_max_bytes = result_max_bytes

    def give(self, response: PerformResponse) -> NoReturn:
        # Later answers (a second callback, an exception after the answer) block here until
        # the winner's os._exit ends the process; they never reach the daemon.
        self._lock.acquire()
        _measure(response)
        payload = response.SerializeToString()
        if len(payload) > self._result_max_bytes:
            payload = _error(
                Kind.RESULT_TOO_LARGE, "ResultTooLarge",
                f"the result is {len(payload)} bytes, above the cap of {self._result_max_bytes} bytes",
            ).SerializeToString()
        _flush_output()
        task_api._channel.flush()
        with contextlib.suppress(OSError):
            task_api._channel.write(frames.ANSWER, payload)
        os._exit(0)

    def outcome(self, outcome: Any, result: Any) -> NoReturn:
        self.give(_verdict(outcome, result))

    def exception(self, exc: BaseException) -> NoReturn:
        asyncio = sys.modules.get("asyncio")
        if task_api.cancelled() and asyncio is not None and isinstance(exc, asyncio.CancelledError):
            # Told to stop, the task let its coroutine be cancelled: that is no answer of its own.
            # The daemon answers TIMEOUT or CANCELLED, saying the notice was given.
            _flush_output()
            os._exit(0)
        self.give(_exception_error(exc))


def _measure(response: PerformResponse) -> None:
    """The process's own usage at the moment it answers: it ends right after, with exit code 0."""
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = response.usage
    usage.user_cpu_ms = (own.ru_utime + waited.ru_utime) * 1e3
    usage.system_cpu_ms = (own.ru_stime + waited.ru_stime) * 1e3
    usage.max_rss_kib = max(own.ru_maxrss, waited.ru_maxrss)
    usage.tmp_full = _tmp_full()


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):  # os._exit flushes nothing; the task may have closed them
        with contextlib.suppress(Exception):
            stream.flush()


def _on_notice(signum: int, frame: Any) -> None:
    """SIGTERM: the task is told to stop (its grace began); it is killed at the grace's end."""
    task_api._channel.cancelled = True


def _is_runner_frame(tb: TracebackType) -> bool:
    filename = tb.tb_frame.f_code.co_filename
    return filename in _RUNNER_FILES or filename.startswith(_RUNNER_DIRS)


def _exception_error(exc: BaseException) -> PerformResponse:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_runner_frame(tb):
        tb = tb.tb_next  # the traceback starts where the task's own code does
    import traceback  # only on this path: the fork server stays smaller without it

    cls = type(exc)
    type_ = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type_
    formatted = "".join(traceback.format_exception(cls, exc, tb))
    limit = _limit_hit(exc)
    if limit is not None:
        response = _error(Kind.LIMIT_EXCEEDED, type_, f"the task exceeded its {limit} limit: {message}", formatted)
        response.error.limit = limit
        return response
    return _error(Kind.EXCEPTION, type_, message, formatted)


def _verdict(outcome: Any, result: Any) -> PerformResponse:
    if type(outcome) is not bool:
        return _error(Kind.RESULT_INVALID, "ResultInvalid", f"outcome must be a bool, got {outcome!r:.200}")
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        return _error(Kind.RESULT_INVALID, "ResultInvalid", f"result must be a dict, got {type(result).__name__}")
    response = PerformResponse(outcome=outcome)
    try:
        to_struct(result, response.result)
    except NotJsonLike as exc:
        return _error(Kind.RESULT_INVALID, "ResultInvalid", f"result{exc}")
    except RecursionError:
        return _error(Kind.RESULT_INVALID, "ResultInvalid", "result is nested too deeply (or contains itself)")
    return response


def _returned(answer: _Answer, value: Any) -> NoReturn:
    """Answer with a sync or async task's return value: a bool, or a (bool, dict) pair."""
    if isinstance(value, tuple) and len(value) == 2:
        answer.outcome(*value)
    if isinstance(value, tuple):
        answer.give(_error(
            Kind.RESULT_INVALID, "ResultInvalid", f"a task returns a bool or (bool, dict), not a {len(value)}-tuple",
        ))
    answer.outcome(value, None)


def _run_async(answer: _Answer, loaded: Loaded, options: dict[str, Any]) -> NoReturn:
    import asyncio  # preloaded by the fork server when a registered task is async

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        answer.exception(exc if isinstance(exc, BaseException) else RuntimeError(context.get("message")))

    async def run_and_answer() -> None:
        main = asyncio.current_task()
        assert main is not None

        def notice() -> None:
            task_api._channel.cancelled = True
            main.cancel()  # the task's coroutine hears the stop as CancelledError

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, notice)
        if task_api.cancelled():  # told before the loop began
            notice()
        # Answer from inside the loop: threads or tasks the task left behind must not delay it.
        _returned(answer, await loaded.function(options))

    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(on_loop_error)
        runner.run(run_and_answer())
    raise AssertionError("unreachable: _returned ends the process")


def _run_callback(answer: _Answer, loaded: Loaded, options: dict[str, Any]) -> NoReturn:
    def callback(err: Any = None, outcome: Any = None, result: Any = None) -> None:
        if err is None:
            answer.outcome(outcome, result)
        if isinstance(err, BaseException):
            answer.exception(err)
        answer.give(_error(Kind.EXCEPTION, type(err).__name__, str(err)))

    loaded.function(options, callback)
    # The callback may still come from another thread. Wait, without polling, until no thread
    # that could call it is left; the callback ends the process the moment it runs.
    main = threading.current_thread()
    while others := [t for t in threading.enumerate() if t is not main and t.is_alive()]:
        for thread in others:
            thread.join()
    answer.give(_error(
        Kind.CRASHED, "CallbackNotCalled",
        "the task returned without calling its callback, and no thread is left that could",
    ))


def run_task(answer: _Answer, loaded: Loaded, options: dict[str, Any]) -> NoReturn:
    if loaded.form is Form.ASYNC:
        _run_async(answer, loaded, options)
    if loaded.form is Form.CALLBACK:
        _run_callback(answer, loaded, options)
    _returned(answer, loaded.function(options))


def _warm_up() -> None:
    """Walk the answer path once while idle, so the pages it touches are copied now, not on the clock.

    After fork() every page is shared copy-on-write, and Python writes to every object it
    touches (reference counts): the first pass through this code costs hundreds of page
    copies. Paying them while the process waits for its task takes them off the latency.
    """
    request = PerformRequest(task="warm-up")
    to_struct({"n": 1, "s": "", "l": [None, True, 1.5], "d": {}}, request.options)
    options = from_struct(PerformRequest.FromString(request.SerializeToString()).options)
    response = _verdict(True, {"options": options})
    _measure(response)
    response.SerializeToString()


def main(registry: Mapping[str, Loaded | str], result_max_bytes: int,
         apply_limits: Callable[[frames.Limits, set[str]], None], private_tmp: bool = False) -> NoReturn:
    """Serve one task: read the assignment from fd 3, run it, answer, exit.

    Args:
        registry: task name -> the callable the fork server preloaded, or its target string
            when preloading failed (it is imported again here, so the error is the task's answer).
        result_max_bytes: the largest serialized answer this process may send.
        apply_limits: sets the assignment's limits on this process, naming each in the set it is given (the last
            step of becoming a task process, task_runner.server.sandbox.contain.apply_limits).
        private_tmp: its /tmp is its sandbox's own (a full one is reported: LIMIT_EXCEEDED "tmp_mb", tmp_full).
    """
    global _private_tmp
    _private_tmp = private_tmp
    _warm_up()
    # Before the assignment: a notice may come the moment the task is handed over (a grace as long
    # as its timeout); it must find the handler, not SIGTERM's default.
    signal.signal(signal.SIGTERM, _on_notice)
    try:
        frame = frames.read(CHANNEL_FD)
    except frames.FrameError:  # the daemon ended while it handed the task over
        frame = None
    if frame is None:  # the daemon closed the channel: this spare process is not needed
        os._exit(0)
    assignment, serialized = frames.Assignment.unpack(frame)
    workdir = assignment.workdir
    channel = task_api._channel
    channel.fd, channel.deadline, channel.request_id = CHANNEL_FD, assignment.deadline, assignment.request_id
    channel.caller = assignment.caller
    channel.traceparent, channel.tracestate = assignment.traceparent, assignment.tracestate
    for name, value in (("TRACEPARENT", assignment.traceparent), ("TRACESTATE", assignment.tracestate)):
        if value:  # OpenTelemetry's environment carrier: an instrumented task continues the caller's trace
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    try:
        request = PerformRequest.FromString(serialized)
    except DecodeError:  # the daemon read all of it but the options (task_runner.server.service): it is they
        with contextlib.suppress(OSError):
            channel.write(frames.OPTIONS_INVALID, b"malformed PerformRequest")
        os._exit(0)
    answer = _Answer(result_max_bytes)
    try:
        options = from_struct(request.options)
    except NotJsonLike as exc:
        with contextlib.suppress(OSError):
            channel.write(frames.OPTIONS_INVALID, f"options{exc}".encode())
        os._exit(0)
    # The runner's verdict goes first, before any task code runs: only as the first frame is it the
    # runner's, so a task cannot forge it (nor the daemon's INVALID_ARGUMENT) by writing on fd 3 itself.
    # With it, the digest of the options' values, which only this process computes (it has them parsed): the
    # daemon tells by it a retry under the same request_id whose options came as other bytes.
    with contextlib.suppress(OSError):
        channel.write(frames.TASK_STARTS, struct_digest(request.options))
    threading.excepthook = lambda args: answer.exception(args.exc_value or RuntimeError("thread died"))
    try:
        if workdir:
            os.chdir(workdir)
            # Its directory is its temporary directory too: what it leaves there goes with it.
            os.environ["TMPDIR"] = os.environ["TMP"] = os.environ["TEMP"] = workdir
            if "tempfile" in sys.modules:  # it may have cached the fork server's: it looks again
                vars(sys.modules["tempfile"])["tempdir"] = None
        apply_limits(assignment.limits, _limited)
        entry = registry[request.task]
        loaded = load(entry) if isinstance(entry, str) else entry
    except BaseException as exc:  # even SystemExit at import is the task's error, not an exit
        answer.exception(exc)
    try:
        run_task(answer, loaded, options)
    except SystemExit as exc:  # sys.exit() ends the process without an answer, as it would anywhere
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        _flush_output()
        os._exit(code)
    except BaseException as exc:
        answer.exception(exc)

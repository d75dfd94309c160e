"""What a task's answer becomes: the response for its own answer frame, or for a process that ended without one.

The daemon trusts a task's frame for its verdict and self-measured usage only; everything the
runner alone may say (the runner's error kinds, exit codes, signals, limits) comes from here.
"""

from __future__ import annotations

import os
import signal

from google.protobuf.message import DecodeError

from task_runner.frames import error_response
from task_runner.server import wire
from task_runner.v1.task_runner_pb2 import PerformResponse, TaskError

Kind = TaskError.Kind
LIMIT_SIGNALS = {int(signal.SIGXCPU): "cpu_time", int(signal.SIGXFSZ): "file_size"}
# The error kinds a task process's own answer may carry; the others (KIND_UNSPECIFIED included) are the
# runner's alone. The runner's verdict on the options is no answer but the channel's first frame (see run.py).
TASK_KINDS = frozenset({Kind.EXCEPTION, Kind.CRASHED, Kind.RESULT_INVALID, Kind.RESULT_TOO_LARGE, Kind.LIMIT_EXCEEDED})


def answer_response(frame: bytes) -> PerformResponse:
    """The response for a task's own answer: only its verdict and its self-measured usage are kept."""
    try:
        answer = PerformResponse.FromString(frame)
    except DecodeError:
        return error_response(Kind.RESULT_INVALID, "ResultInvalid", "the task's answer could not be decoded")
    response = PerformResponse(outcome=answer.outcome)
    response.result.CopyFrom(answer.result)
    if answer.HasField("error"):
        if answer.error.kind not in TASK_KINDS:  # a task's own frame may claim anything
            name = Kind.Name(answer.error.kind) if answer.error.kind in Kind.values() else str(answer.error.kind)
            return error_response(
                Kind.RESULT_INVALID, "ResultInvalid",
                f"the task's answer claimed the error kind {name}, which only the runner gives "
                f"(its type: {answer.error.type[:100]!r})",
            )
        response.error.CopyFrom(answer.error)
        response.error.exit_code = response.error.signal = 0  # the runner's to tell, from the exit status
        response.error.notice_given = False
    usage = response.usage
    usage.user_cpu_ms, usage.system_cpu_ms = answer.usage.user_cpu_ms, answer.usage.system_cpu_ms
    usage.max_rss_kib = answer.usage.max_rss_kib
    usage.tmp_full = answer.usage.tmp_full  # its own to tell: the tmpfs is its alone, and gone once it ends
    return response


def fill_usage(response: PerformResponse, exit_: wire.Exited, handed_at: float) -> None:
    usage = response.usage
    usage.wall_ms = (exit_.at - handed_at) * 1e3
    usage.user_cpu_ms, usage.system_cpu_ms = exit_.user_s * 1e3, exit_.system_s * 1e3
    usage.max_rss_kib = exit_.max_rss_kib
    usage.exit_code, usage.signal = exit_fields(exit_.status)


def exit_fields(status: int) -> tuple[int, int]:
    """(exit code, signal) of a wait status; the one that does not apply is 0."""
    if os.WIFSIGNALED(status):
        return 0, os.WTERMSIG(status)
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0), 0


def describe_status(status: int) -> str:
    code, signum = exit_fields(status)
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"was killed by {name} (signal {signum})"
    return f"exited with code {code}"


def failure_response(exit_: wire.Exited, budget_s: float, answer_limit: int, cpu_limit_s: int | None,
                     noticed: wire.Stop | None = None, stall_s: float | None = None) -> PerformResponse:
    """The response for a task process that ended without a (complete) answer.

    Args:
        exit_: how it ended.
        budget_s: the time it had.
        answer_limit: the bytes it could write as its answer.
        cpu_limit_s: its CPU time limit, if any: a SIGKILL past it is the kernel's, at the hard limit.
        noticed: why it was told to stop before it ended, if it was (TIMEOUT: its grace before the
            deadline; CANCELLED: a Cancel or a drain).
        stall_s: its heartbeat timeout, if it had one.
    """
    notice = " (it was told to stop first)" if noticed is not None else ""
    code, signum = exit_fields(exit_.status)
    stop = exit_.why
    if stop is wire.Stop.NONE and noticed is not None and signum in (0, signal.SIGTERM):
        stop = noticed  # told to stop, it ended (or let SIGTERM end it) without answering: as if killed for that
    if stop is wire.Stop.RESULT_TOO_LARGE:
        return error_response(
            Kind.RESULT_TOO_LARGE, "ResultTooLarge",
            f"the task wrote more than {answer_limit} bytes as its answer; it was killed",
        )
    if stop is wire.Stop.STALLED:
        return error_response(
            Kind.STALLED, "Stalled",
            f"the task sent no heartbeat for {(stall_s or 0) * 1e3:.0f} ms (its heartbeat_timeout_ms); "
            "its process tree was killed", exit_code=code, signal=signum,
        )
    if stop is wire.Stop.TIMEOUT:
        response = error_response(
            Kind.TIMEOUT, "Timeout",
            f"the task did not finish within {budget_s * 1e3:.0f} ms{notice}; its process tree was killed",
            exit_code=code, signal=signum,
        )
        response.error.notice_given = noticed is not None
        return response
    limit = LIMIT_SIGNALS.get(signum)
    if (signum == signal.SIGKILL and stop is wire.Stop.NONE and cpu_limit_s is not None
            and exit_.user_s + exit_.system_s >= cpu_limit_s):
        limit = "cpu_time"  # it ignored SIGXCPU: the kernel killed it at the hard limit
    if exit_.oom_killed:
        limit = "memory"
    if limit is not None:
        response = error_response(
            Kind.LIMIT_EXCEEDED, "LimitExceeded",
            f"the task exceeded its {limit} limit: its process {describe_status(exit_.status)}",
            exit_code=code, signal=signum,
        )
        response.error.limit = limit
        return response
    if stop is wire.Stop.CANCELLED:
        response = error_response(
            Kind.CANCELLED, "Cancelled", f"the call was cancelled{notice}; the task's process tree was killed",
            exit_code=code, signal=signum,
        )
        response.error.notice_given = noticed is not None
        return response
    return error_response(
        Kind.CRASHED, "Crashed", f"the task process {describe_status(exit_.status)} without answering",
        exit_code=code, signal=signum,
    )

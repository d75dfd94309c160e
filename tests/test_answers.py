"""What a task's end becomes (task_runner.server.answers): the response for a process that ended without an
answer, from how it ended alone, and what of a task's own answer frame the daemon keeps."""

from __future__ import annotations

import signal

import pytest

from task_runner.server.answers import answer_response, failure_response
from task_runner.server.wire import Exited, Stop
from task_runner.v1.task_runner_pb2 import PerformResponse, TaskError

Kind = TaskError.Kind


def exited(code: int = 0, signum: int = 0, stop: Stop = Stop.NONE, cpu_s: float = 0.0,
           oom_killed: bool = False) -> Exited:
    """How a task process ended, as the fork server reports it (a wait status: the signal, or the code)."""
    return Exited(1, signum or code << 8, cpu_s / 2, cpu_s / 2, 1024, stop, oom_killed, 0.0)


def failure(exit_: Exited, noticed: Stop | None = None, cpu_limit_s: int | None = None) -> TaskError:
    return failure_response(exit_, 1.5, 1 << 20, cpu_limit_s, noticed, 0.25).error


def test_a_process_that_exits_without_answering_crashed_with_its_code() -> None:
    error = failure(exited(code=3))
    assert (error.kind, error.type, error.exit_code, error.signal) == (Kind.CRASHED, "Crashed", 3, 0)
    assert error.message == "the task process exited with code 3 without answering"


def test_a_process_killed_by_a_signal_crashed_and_names_it() -> None:
    error = failure(exited(signum=signal.SIGSEGV))
    assert (error.kind, error.exit_code, error.signal) == (Kind.CRASHED, 0, signal.SIGSEGV)
    assert error.message == "the task process was killed by SIGSEGV (signal 11) without answering"


def test_the_deadline_is_a_timeout_with_the_time_it_had() -> None:
    error = failure(exited(signum=signal.SIGKILL, stop=Stop.TIMEOUT))
    assert (error.kind, error.signal, error.notice_given) == (Kind.TIMEOUT, signal.SIGKILL, False)
    assert error.message == "the task did not finish within 1500 ms; its process tree was killed"
    noticed = failure(exited(signum=signal.SIGKILL, stop=Stop.TIMEOUT), noticed=Stop.TIMEOUT)
    assert noticed.notice_given and "(it was told to stop first)" in noticed.message


@pytest.mark.parametrize(("stop", "kind", "text"), [
    (Stop.RESULT_TOO_LARGE, Kind.RESULT_TOO_LARGE, "more than 1048576 bytes as its answer"),
    (Stop.STALLED, Kind.STALLED, "no heartbeat for 250 ms"),
    (Stop.CANCELLED, Kind.CANCELLED, "the call was cancelled; the task's process tree was killed"),
])
def test_a_kill_the_daemon_asked_for_says_why(stop: Stop, kind: TaskError.Kind.ValueType, text: str) -> None:
    error = failure(exited(signum=signal.SIGKILL, stop=stop))
    assert error.kind == kind and text in error.message


@pytest.mark.parametrize(("signum", "limit"), [(signal.SIGXCPU, "cpu_time"), (signal.SIGXFSZ, "file_size")])
def test_a_limit_signal_is_that_limit_exceeded(signum: int, limit: str) -> None:
    error = failure(exited(signum=signum))
    assert (error.kind, error.limit, error.signal) == (Kind.LIMIT_EXCEEDED, limit, signum)
    assert error.message.startswith(f"the task exceeded its {limit} limit: its process was killed by")


def test_a_sigkill_past_the_cpu_limit_is_the_kernels_and_one_before_it_a_crash() -> None:
    assert failure(exited(signum=signal.SIGKILL, cpu_s=2.0), cpu_limit_s=2).limit == "cpu_time"
    assert failure(exited(signum=signal.SIGKILL, cpu_s=1.9), cpu_limit_s=2).kind == Kind.CRASHED
    assert failure(exited(signum=signal.SIGKILL, cpu_s=9.0)).kind == Kind.CRASHED  # no limit to pass


def test_the_oom_killer_is_the_memory_limit_whatever_the_signal() -> None:
    error = failure(exited(signum=signal.SIGKILL, oom_killed=True))
    assert (error.kind, error.limit) == (Kind.LIMIT_EXCEEDED, "memory")


def test_a_task_told_to_stop_that_ends_without_answering_ends_for_that_reason() -> None:
    for how in (exited(code=0), exited(signum=signal.SIGTERM)):
        error = failure(how, noticed=Stop.CANCELLED)
        assert (error.kind, error.notice_given) == (Kind.CANCELLED, True)
        assert "(it was told to stop first)" in error.message
    assert failure(exited(signum=signal.SIGTERM), noticed=Stop.TIMEOUT).kind == Kind.TIMEOUT
    assert failure(exited(signum=signal.SIGABRT), noticed=Stop.CANCELLED).kind == Kind.CRASHED  # its own end


def test_a_tasks_own_answer_keeps_its_verdict_and_usage_but_not_what_the_runner_alone_says() -> None:
    answer = PerformResponse(outcome=True)
    answer.result.update({"n": 1})
    answer.error.kind, answer.error.type, answer.error.exit_code, answer.error.signal = Kind.EXCEPTION, "E", 7, 9
    answer.usage.max_rss_kib, answer.usage.wall_ms = 2048, 99_999
    kept = answer_response(answer.SerializeToString())
    assert kept.outcome and dict(kept.result) == {"n": 1} and kept.usage.max_rss_kib == 2048
    assert (kept.error.kind, kept.error.type, kept.error.exit_code, kept.error.signal) == (Kind.EXCEPTION, "E", 0, 0)
    assert kept.usage.wall_ms == 0  # the daemon measures that


def test_an_answer_claiming_the_runners_kind_or_not_decoding_is_invalid() -> None:
    claimed = PerformResponse()
    claimed.error.kind = Kind.TIMEOUT
    for frame in (claimed.SerializeToString(), b"\xff\xff"):
        assert answer_response(frame).error.kind == Kind.RESULT_INVALID

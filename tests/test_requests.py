"""Bad input gets a clear status and loses nothing; a full queue answers at once; cancellation kills."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from task_runner.client import (
    NO_RETRY,
    Client,
    InvalidRequest,
    Overloaded,
    TaskNotFound,
)
from task_runner.v1 import task_runner_pb2 as pb
from tests.conftest import Daemon, read_pids, start_daemon, wait_gone, wait_until


def raw_call(target: str, method: str, payload: bytes, timeout: float = 10) -> bytes:
    """Call a method with raw bytes, as a client in another language might send them."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/task_runner.v1.TaskRunner/{method}")
        return call(payload, timeout=timeout)  # type: ignore[no-any-return]


def test_unknown_task_is_not_found(client: Client) -> None:
    with pytest.raises(TaskNotFound, match=r"unknown task 'no-such-task'; this daemon serves: .*echo"):
        client.call("no-such-task", 1000)


def test_a_thousand_unknown_names_each_not_found(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.unix) as channel:
        perform = channel.unary_unary(
            "/task_runner.v1.TaskRunner/Perform",
            request_serializer=pb.PerformRequest.SerializeToString,
            response_deserializer=pb.PerformResponse.FromString,
        )
        futures = [perform.future(pb.PerformRequest(task=f"unknown-{i}"), timeout=30) for i in range(1000)]
        codes = {f.exception().code() for f in futures}  # type: ignore[union-attr]
    assert codes == {grpc.StatusCode.NOT_FOUND}
    with daemon.client() as client:
        assert client.call("echo", 5000).outcome


def test_empty_task_name_is_invalid(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="task name is required"):
        client.call("", 1000)


def test_timeout_above_the_maximum_is_invalid(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="above the maximum"):
        client.call("echo", 2**32 - 1)


def test_timeout_zero_means_the_default(client: Client) -> None:
    assert client.call("echo", 0).outcome is True


def test_malformed_options_refused_before_sending(client: Client) -> None:
    with pytest.raises(InvalidRequest, match=r"options\['when'\]: set is not JSON-like"):
        client.call("echo", 1000, {"when": {1, 2}})
    with pytest.raises(InvalidRequest, match="beyond 2\\^53"):
        client.call("echo", 1000, {"n": 2**60})


def test_malformed_request_bytes_are_invalid_argument(daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(daemon.unix, "Perform", b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "malformed PerformRequest" in caught.value.details()  # type: ignore[attr-defined]


def test_oversized_request_is_refused(daemon: Daemon) -> None:
    request = pb.PerformRequest(task="echo")
    request.options.update({"blob": "x" * (5 << 20)})
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(daemon.unix, "Perform", request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


def test_request_id_too_long_is_invalid(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="request_id"):
        client.call("echo", 1000, request_id="x" * 129)


def test_full_queue_answers_at_once_and_loses_nothing(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "max_running = 2\nmax_queued = 3\nspare_processes = 1")
    try:
        with Client(daemon.unix, retry=NO_RETRY) as client:
            refusal_times: list[float] = []

            def one(_: int) -> str:
                started = time.monotonic()
                try:
                    return "ok" if client.call("sleep", 10_000, {"ms": 500}).outcome else "false"
                except Overloaded as exc:
                    assert "queue full" in exc.message
                    refusal_times.append(time.monotonic() - started)
                    return "overloaded"
            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(one, range(20)))
            assert answers.count("ok") >= 5  # 2 running + 3 queued at least
            assert answers.count("overloaded") >= 1 and answers.count("ok") + answers.count("overloaded") == 20
            assert max(refusal_times) < 0.5 * 10  # refused at once (a generous bound), not after waiting
            assert client.call("echo", 5000).outcome  # and it serves on
    finally:
        assert daemon.stop() == 0


def test_client_cancel_kills_the_task_and_frees_its_slot(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "max_running = 1\nmax_queued = 0")
    try:
        pidfile = tmp_path / "pids"
        with Client(daemon.unix, retry=NO_RETRY) as client, grpc.insecure_channel(daemon.unix) as channel:
            perform = channel.unary_unary(
                "/task_runner.v1.TaskRunner/Perform",
                request_serializer=pb.PerformRequest.SerializeToString,
                response_deserializer=pb.PerformResponse.FromString,
            )
            request = pb.PerformRequest(task="write_pid_and_sleep", timeout_ms=60_000)
            request.options.update({"pidfile": str(pidfile), "s": 60})
            future = perform.future(request, timeout=60)
            assert wait_until(lambda: read_pids(pidfile), 10)  # the task has started
            future.cancel()
            assert wait_gone(read_pids(pidfile), timeout=2) == []
            # The only slot is free again: this call is admitted, not refused with RESOURCE_EXHAUSTED.
            assert client.call("echo", 5000).outcome
        assert "error=CANCELLED" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


def test_rpc_deadline_ends_the_task(client: Client, tmp_path: Path) -> None:
    from task_runner.client import TaskTimeout

    pidfile = tmp_path / "pids"
    with pytest.raises(TaskTimeout):  # ended 200 ms (a tenth) before the RPC's deadline: the answer still arrives
        client.call("write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60}, rpc_timeout=2)
    pids = read_pids(pidfile)
    assert pids and wait_gone(pids, timeout=2) == []


def test_non_finite_options_from_another_language_are_invalid(daemon: Daemon) -> None:
    request = pb.PerformRequest(task="echo", timeout_ms=1000)
    request.options.update({"x": [1, float("nan")]})
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(daemon.unix, "Perform", request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "['x'][1]: nan is not a finite number" in caught.value.details()  # type: ignore[attr-defined]


def test_request_id_with_a_newline_is_invalid(client: Client, daemon: Daemon) -> None:
    """A request_id goes into log lines: one with a newline could forge a line of its own."""
    with pytest.raises(InvalidRequest, match="printable"):
        client.call("echo", 1000, request_id="ok\n2026-12-01 INFO task_runner.server: forged")
    assert "forged" not in daemon.log_text()


def test_a_full_queue_says_when_to_retry_in_the_status_details(tmp_path: Path) -> None:
    """The retry hint is google.rpc.ErrorInfo and RetryInfo in the status details, for any caller to read."""
    from google.rpc import error_details_pb2, status_pb2

    from task_runner.client import RetryPolicy

    daemon = start_daemon(tmp_path / "d", "max_running = 1\nmax_queued = 0\n")
    try:
        with Client(daemon.unix, retry=NO_RETRY) as client, ThreadPoolExecutor(1) as pool:
            pidfile = tmp_path / "pids"
            busy = pool.submit(client.call, "write_pid_and_sleep", 20_000, {"pidfile": str(pidfile), "s": 5})
            assert wait_until(lambda: read_pids(pidfile), 10)  # it holds the one slot
            request = pb.PerformRequest(task="echo", timeout_ms=1000).SerializeToString()
            with pytest.raises(grpc.RpcError) as caught:
                raw_call(daemon.unix, "Perform", request)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            trailer = dict(error.trailing_metadata())  # type: ignore[attr-defined]
            status = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
            assert (info.reason, info.domain) == ("QUEUE_FULL", "task_runner.v1.TaskRunner")
            assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(0.1)
            with pytest.raises(Overloaded) as refused:  # the Python client reads the same
                client.call("echo", 1000)
            assert (refused.value.reason, refused.value.retry_delay_s) == ("QUEUE_FULL", pytest.approx(0.1))
            patient = Client(daemon.unix, retry=RetryPolicy(transport_attempts=4, initial_backoff_s=0.001))
            with patient:
                started = time.monotonic()
                with pytest.raises(Overloaded):
                    patient.call("echo", 1000)
                assert time.monotonic() - started >= 3 * 0.1  # each retry waited as long as it was told
            assert busy.result(20).outcome
    finally:
        assert daemon.stop() == 0



def test_a_task_ends_a_tenth_of_its_calls_time_before_the_rpc_deadline_from_50_ms_to_1_s() -> None:
    from task_runner.server.service import rpc_deadline_margin

    assert [rpc_deadline_margin(s) for s in (0.1, 0.5, 2.0, 10.0, 60.0)] == [0.05, 0.05, 0.2, 1.0, 1.0]

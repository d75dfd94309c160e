"""Big requests of many small values: the daemon reads a PerformRequest without building its options
(PerformRequestWire: they stay bytes, parsed and checked by the task process), so that such requests
delay no other call, and their options still reach the task intact and count for idempotency by value."""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.struct_pb2 import Struct

from task_runner.v1 import task_runner_pb2 as pb
from task_runner.v1.internal_pb2 import PerformRequestWire
from tests.conftest import Daemon, start_daemon

MIB = 1 << 20
SERVICE = "/task_runner.v1.TaskRunner"
TASK = '[tasks.digest]\ntarget = "tests.tasks.digest:options_sha256"\n'


def many_values(size: int) -> dict[str, Any]:
    """Options of about `size` bytes serialized, made of small values (22 bytes an entry)."""
    return {f"k{i}": i for i in range(size // 22)}


def sha256_of(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def serialized(task: str, entries: list[tuple[str, Any]], request_id: str = "", **fields: Any) -> bytes:
    """A PerformRequest whose options' map entries are serialized in the order of `entries` (as another
    serializer, or another process of Python's, may order them)."""
    options = b"".join(Struct(fields={key: _value(value)}).SerializeToString() for key, value in entries)
    return PerformRequestWire(task=task, request_id=request_id, options=[options], **fields).SerializeToString()


def _value(value: Any) -> Any:
    struct = Struct()
    struct.update({"v": value})
    return struct.fields["v"]


def test_the_daemons_view_of_a_perform_request_mirrors_the_public_one() -> None:
    """Every field of PerformRequest is in PerformRequestWire, by name, number and type, but `options`
    (bytes there, each occurrence on the wire): a field added to one and not the other fails here."""
    public = {f.name: (f.number, f.type) for f in pb.PerformRequest.DESCRIPTOR.fields}
    wire = {f.name: (f.number, f.type) for f in PerformRequestWire.DESCRIPTOR.fields}
    assert public.keys() == wire.keys()
    options = PerformRequestWire.DESCRIPTOR.fields_by_name["options"]
    assert options.type == options.TYPE_BYTES and options.is_repeated
    assert {name: kind for name, kind in public.items() if name != "options"} == \
           {name: kind for name, kind in wire.items() if name != "options"}


def test_options_that_are_no_struct_are_a_malformed_request(daemon: Daemon) -> None:
    """Bytes in `options` that parse as no Struct are refused INVALID_ARGUMENT "malformed PerformRequest",
    as when the daemon parsed them itself; now the task process says so, before any task code runs."""
    with grpc.insecure_channel(daemon.unix) as channel:
        perform = channel.unary_unary(f"{SERVICE}/Perform")
        with pytest.raises(grpc.RpcError) as caught:
            perform(PerformRequestWire(task="echo", options=[b"\xff\xff\xff"]).SerializeToString(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert caught.value.details() == "malformed PerformRequest"  # type: ignore[attr-defined]


async def _echo_latency(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> float:
    request = pb.PerformRequest(task="echo", timeout_ms=30_000).SerializeToString()
    started = time.perf_counter()
    answer = pb.PerformResponse.FromString(await perform(request, timeout=60))
    assert answer.outcome, answer
    return time.perf_counter() - started


def test_big_requests_of_many_values_delay_no_echo(tmp_path: Path) -> None:
    """Four valid ~3.9 MiB requests, each of 180,000 small values, in flight at once: echo calls sent
    meanwhile take at most 0.3 s longer than echo calls alone (the slowest of each), and the four are
    answered with the digest of the very options sent. An earlier daemon parsed each request's options
    on its event loop (0.35 s a request, and as much again for the idempotency digest): an echo waited
    1.1-1.5 s."""
    options = many_values(4 * MIB - 64 * 1024)
    big = pb.PerformRequest(task="digest", timeout_ms=60_000)
    big.options.update(options)
    assert 3.5 * MIB < big.ByteSize() <= 4 * MIB
    requests = []
    for n in range(4):
        big.request_id = f"big-{n}"  # as the Python client sends every call: the daemon digests its options
        requests.append(big.SerializeToString())
    daemon = start_daemon(tmp_path, f'cgroup = "off"\n{TASK}')
    try:
        async def run() -> tuple[list[float], list[float], list[pb.PerformResponse]]:
            channel_options = [("grpc.max_send_message_length", 8 * MIB)]
            async with grpc.aio.insecure_channel(daemon.unix, options=channel_options) as channel:
                perform = channel.unary_unary(f"{SERVICE}/Perform")
                alone = [await _echo_latency(perform) for _ in range(8)]
                bigs = [asyncio.ensure_future(perform(request, timeout=120)) for request in requests]
                during = []
                while not all(call.done() for call in bigs) or not during:
                    during.append(await _echo_latency(perform))
                return alone, during, [pb.PerformResponse.FromString(await call) for call in bigs]

        alone, during, answers = asyncio.run(run())
        for answer in answers:
            assert answer.outcome and not answer.HasField("error"), answer.error
            assert answer.result["sha256"] == sha256_of(options) and answer.result["keys"] == len(options)
        delay = max(during) - max(alone)
        assert delay <= 0.3, f"an echo took {max(during) * 1e3:.0f} ms beside the big requests " \
                             f"({len(during)} echoes, median {statistics.median(during) * 1e3:.0f} ms), " \
                             f"{max(alone) * 1e3:.0f} ms at most alone"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.parametrize("first", ["waiting", "running", "finished"])
def test_a_retry_whose_options_come_as_other_bytes_shares_the_execution(tmp_path: Path, first: str) -> None:
    """The daemon tells requests under one request_id apart by their options' values, not their bytes:
    the same options with their map in another order (another process of Python's orders it its own
    way) share the execution, whether it waits, runs or finished; other values are REQUEST_ID_REUSED."""
    daemon = start_daemon(tmp_path, 'cgroup = "off"\nmax_running = 1\n')
    entries = [("ms", 300), *[(f"k{i}", {"nested": [i, str(i)], "z": i, "a": None}) for i in range(50)]]
    one = serialized("sleep", entries, "rid", timeout_ms=30_000)
    other_order = serialized("sleep", entries[::-1], "rid", timeout_ms=30_000)
    assert one != other_order
    different = serialized("sleep", [*entries, ("extra", 1)], "rid", timeout_ms=30_000)
    try:
        async def run() -> tuple[bytes, bytes, grpc.StatusCode, str]:
            async with grpc.aio.insecure_channel(daemon.unix) as channel:
                perform = channel.unary_unary(f"{SERVICE}/Perform")
                stream = channel.unary_stream(f"{SERVICE}/PerformStream")
                hold: grpc.aio.UnaryStreamCall[bytes, bytes] | None = None
                if first == "waiting":  # the only slot is busy: the first call waits
                    hold = stream(serialized("sleep", [("ms", 30_000)], "holder", timeout_ms=60_000), timeout=60)
                    async for event in hold:
                        if pb.PerformEvent.FromString(event).WhichOneof("event") == "started":
                            break
                events = stream(one, timeout=60)
                async for event in events:
                    kind = pb.PerformEvent.FromString(event).WhichOneof("event")
                    if kind == ("queued" if first == "waiting" else "started"):
                        break
                if first == "finished":
                    async for _ in events:
                        pass
                again = asyncio.ensure_future(perform(other_order, timeout=60))
                try:
                    await perform(different, timeout=60)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                if hold is not None:
                    hold.cancel()
                answer = await again
                async for _ in events:
                    pass
                return answer, await perform(one, timeout=60), code, details

        answer, repeated, code, details = asyncio.run(run())
        assert pb.PerformResponse.FromString(answer).outcome
        assert answer == repeated  # one execution: the same answer, the same request id and timings
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "used for a different request" in details, details
        assert daemon.log_text().count("task sleep finished: outcome=true") == 1
    finally:
        assert daemon.stop() == 0, daemon.log_text()

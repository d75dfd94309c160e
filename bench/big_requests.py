"""Big requests, on one daemon with `max_queued_bytes = 256 MiB` and the task `hold` at one at a time:

- `queue_memory`: one `hold` call holds its slot; 100 calls of `hold` of ~4 MiB each (one long string:
  what the daemon holds of a request does not depend on its values, and the waiting calls' task processes
  then parse them fast) arrive at once, and wait or are refused (QUEUE_BYTES_FULL). The daemon's RSS
  growth while they wait, per byte the waiting calls' requests hold, and against max_queued_bytes;
- `echo_delay`: the no-op task one call at a time, alone, then while four ~4 MiB no-op calls of many
  small values are in flight (each with a request id, as the Python client sends): the p50 and max of
  each, and their difference (the delay the big requests cost an echo), in alternating rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import grpc.aio
import psutil

from bench import procs
from bench.drivers import median, open_channel, percentile
from bench.scale import HOLD_TASK, HOLD_TIMEOUT_MS, Gauges, free_port, start_daemon
from bench.settings import Progress, Settings
from task_runner.v1.task_runner_pb2 import CancelRequest, PerformEvent, PerformRequest, PerformResponse

MIB = 1 << 20
MAX_QUEUED_BYTES = 256 * MIB
QUEUED_CALLS = 100
BIG_CALLS = 4
ECHOES_ALONE = 20
SERVICE = "/task_runner.v1.TaskRunner"
HOLDER = "bench-holder"


def daemon_config(settings: Settings, metrics_port: int) -> str:
    return "\n".join([
        f"max_running = {settings.max_running}",
        f"max_queued_bytes = {MAX_QUEUED_BYTES}",
        'log_level = "WARNING"',
        "entry_points = false",
        "drain_grace_s = 5",
        f'metrics_listen = "127.0.0.1:{metrics_port}"',
        "",
        "[tasks]",
        'noop = "bench.tasks:noop"',
        "",
        f"[tasks.{HOLD_TASK}]",
        'target = "bench.scale_tasks:hold"',
        "max_running = 1",
        "",
    ])


def big_request(task: str, request_id: str = "", many: bool = True, **options: Any) -> bytes:
    """A request of just under 4 MiB (the daemon's default max_request_bytes): of 22-byte values, or
    (`many` False) of one string."""
    request = PerformRequest(task=task, timeout_ms=HOLD_TIMEOUT_MS, request_id=request_id)
    size = 4 * MIB - 64 * 1024
    request.options.update({**options, **({f"k{i}": i for i in range(size // 22)} if many else {"pad": "x" * size})})
    return request.SerializeToString()


async def run_phase(directory: Path, settings: Settings, progress: Progress, services: list[procs.Service],
                    ) -> dict[str, Any]:
    port = free_port()
    daemon = await asyncio.to_thread(start_daemon, directory, daemon_config(settings, port))
    services.append(daemon)
    try:
        channel = await open_channel(daemon.target(settings.transport))
        try:
            memory = await queue_memory(channel, daemon.pid, Gauges(port))
            progress.note(f"queue memory: {memory['waiting']} calls of {memory['request_mib']:.1f} MiB waiting grew "
                          f"the daemon by {memory['grown_mib']:.0f} MiB: {memory['growth_per_queued_byte']:.2f} "
                          f"per queued byte, {memory['growth_per_max_queued_bytes']:.2f} x max_queued_bytes")
            delay = await echo_delay(channel, settings.sandbox_repeats)
            progress.note(f"echo delay: p50 {delay['alone']['p50_ms']:.1f} ms alone, {delay['beside']['p50_ms']:.1f} "
                          f"ms beside {BIG_CALLS} big requests (max {delay['beside']['max_ms']:.0f} ms)")
            return {"queue_memory": memory, "echo_delay": delay}
        finally:
            await channel.close(None)
    finally:
        await asyncio.to_thread(daemon.stop)


async def queue_memory(channel: grpc.aio.Channel, pid: int, gauges: Gauges) -> dict[str, Any]:
    process = psutil.Process(pid)
    perform = channel.unary_unary(f"{SERVICE}/Perform")
    payload = big_request(HOLD_TASK, many=False, seconds=0)
    holder = channel.unary_stream(f"{SERVICE}/PerformStream")(
        PerformRequest(task=HOLD_TASK, timeout_ms=HOLD_TIMEOUT_MS, request_id=HOLDER).SerializeToString(),
        timeout=600)
    async for raw in holder:
        if PerformEvent.FromString(raw).WhichOneof("event") == "started":
            break
    before = process.memory_info().rss
    refused = 0

    async def one() -> bool:
        nonlocal refused
        try:
            return PerformResponse.FromString(await perform(payload, timeout=600)).outcome
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refused += 1
            return False
    calls = [asyncio.ensure_future(one()) for _ in range(QUEUED_CALLS)]
    values, took_s = await gauges.wait(lambda v: v.get("queued", 0) + refused >= QUEUED_CALLS, 120,
                                       lambda: any(call.done() and call.exception() for call in calls))
    grown = process.memory_info().rss - before
    waiting = int(values.get("queued", 0))
    cancel = channel.unary_unary(f"{SERVICE}/Cancel")
    await cancel(CancelRequest(request_id=HOLDER).SerializeToString(), timeout=60)
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in holder:
            pass
    answered = sum(await asyncio.gather(*calls))
    queued_bytes = waiting * len(payload)
    return {
        "request_mib": len(payload) / MIB, "calls": QUEUED_CALLS, "waiting": waiting, "refused": refused,
        "answered_ok": answered, "fill_s": took_s, "rss_before_mib": before / MIB, "grown_mib": grown / MIB,
        "max_queued_bytes_mib": MAX_QUEUED_BYTES / MIB,
        "growth_per_queued_byte": grown / queued_bytes if queued_bytes else None,
        "growth_per_max_queued_bytes": grown / MAX_QUEUED_BYTES,
    }


async def _echo(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], request: bytes) -> float:
    started = time.perf_counter()
    answer = PerformResponse.FromString(await perform(request, timeout=60))
    if not answer.outcome:
        raise RuntimeError(f"the no-op task failed: {answer.error}")
    return (time.perf_counter() - started) * 1e3


async def echo_delay(channel: grpc.aio.Channel, rounds: int) -> dict[str, Any]:
    perform = channel.unary_unary(f"{SERVICE}/Perform")
    echo = PerformRequest(task="noop", timeout_ms=30_000).SerializeToString()
    bigs = [big_request("noop", f"bench-big-{n}") for n in range(BIG_CALLS)]  # the big calls' requests differ
    alone: list[float] = []
    beside: list[float] = []
    for round_ in range(rounds):
        alone += [await _echo(perform, echo) for _ in range(ECHOES_ALONE)]
        # Request ids of this round (of the same length: the bytes stay valid), or the daemon would answer
        # the calls from its idempotency cache.
        calls = [asyncio.ensure_future(perform(big.replace(b"bench-big-", f"r{round_:04d}-big-".encode()),
                                               timeout=600)) for big in bigs]
        during = [await _echo(perform, echo)]
        while not all(call.done() for call in calls):
            during.append(await _echo(perform, echo))
        for answer in await asyncio.gather(*calls):
            if not PerformResponse.FromString(answer).outcome:
                raise RuntimeError("a big no-op call failed")
        beside += during

    def summary(values: list[float]) -> dict[str, Any]:
        return {"calls": len(values), "p50_ms": median(values), "p99_ms": percentile(values, 99),
                "max_ms": max(values)}
    result = {"rounds": rounds, "big_calls": BIG_CALLS, "big_request_mib": len(bigs[0]) / MIB,
              "alone": summary(alone), "beside": summary(beside)}
    result["p50_delay_ms"] = result["beside"]["p50_ms"] - result["alone"]["p50_ms"]
    result["max_delay_ms"] = result["beside"]["max_ms"] - result["alone"]["max_ms"]
    return result

"""Client loops: N coroutines, each making one call after another, on one grpc.aio channel.

The same loop drives every system measured (the bare echo service, Perform and the two
process-per-task baselines), and the same `RpcCall` drives both the echo service and Perform,
so their figures differ only by what answers the call.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from task_runner.v1.task_runner_pb2 import DESCRIPTOR, PerformRequest, PerformResponse, TaskError

PERFORM_METHOD = f"/{DESCRIPTOR.services_by_name['TaskRunner'].full_name}/Perform"
Timings = tuple[float, float, float, float]  # queue, start, run, collect (ms), as the daemon reports them
TIMING_NAMES = ("queue_ms", "start_ms", "run_ms", "collect_ms")
Outcome = tuple[str | None, Timings | None]  # (what went wrong, None if nothing; the daemon's timings)
Call = Callable[[], Awaitable[Outcome]]
MAX_CALLS = 1_000_000  # the count bound of every time-bounded loop
WARMUP_MAX_S = 30.0  # the longest warm-up of a throughput window
WINDOW_MAX_S = 20.0  # the longest a throughput window is stretched to hold its minimum of answers


@dataclass
class RunStats:
    """What one loop saw: per-call latencies, failures by kind, the daemon's timings."""

    concurrency: int
    calls: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    timings: list[Timings] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.calls - sum(self.failures.values())

    @property
    def throughput(self) -> float:
        """Calls answered as expected, per second of the loop's wall time."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0


def merge(runs: Iterable[RunStats]) -> RunStats:
    """Pool the calls of several runs (their elapsed times add up)."""
    runs = list(runs)
    pooled = RunStats(runs[0].concurrency if runs else 0)
    for run in runs:
        pooled.calls += run.calls
        pooled.elapsed_s += run.elapsed_s
        pooled.latencies_ms += run.latencies_ms
        pooled.failures.update(run.failures)
        pooled.timings += run.timings
    return pooled


async def _attempt(call: Call) -> tuple[float, str | None, Timings | None]:
    """Make one call: its latency in ms, what went wrong (None if nothing), the daemon's timings."""
    t0 = time.perf_counter()
    try:
        failure, timings = await call()
    except Exception as exc:  # a broken call is a failure to count, not the end of the benchmark
        failure, timings = f"{type(exc).__name__}: {exc}"[:120], None
    return (time.perf_counter() - t0) * 1e3, failure, timings


def _record(stats: RunStats, latency_ms: float, failure: str | None, timings: Timings | None) -> None:
    stats.latencies_ms.append(latency_ms)
    stats.calls += 1
    if failure is not None:
        stats.failures[failure] += 1
    if timings is not None:
        stats.timings.append(timings)


async def closed_loop(call: Call, concurrency: int, *, max_calls: int, max_seconds: float,
                      pause_s: float = 0.0) -> RunStats:
    """`concurrency` coroutines call one after another until `max_calls` are started or `max_seconds` pass,
    each waiting `pause_s` after each answer.

    Every call started is awaited and counted: the elapsed time runs to the last answer.
    """
    stats = RunStats(concurrency)
    started = 0
    begin = time.perf_counter()
    end = begin + max_seconds

    async def worker() -> None:
        nonlocal started
        while started < max_calls and time.perf_counter() < end:
            started += 1
            _record(stats, *await _attempt(call))
            if pause_s:
                await asyncio.sleep(pause_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.elapsed_s = time.perf_counter() - begin
    return stats


async def steady_window(
    call: Call, concurrency: int, *, warmup_calls: int, warmup_s: float, window_s: float, min_calls: int,
) -> tuple[RunStats, RunStats]:
    """Throughput in steady state: (the window's calls, the warm-up's calls).

    `concurrency` coroutines call one after another. The first answers are the warm-up: at least
    `warmup_calls` of them, or, once `warmup_s` has passed, at least one per coroutine (so every
    coroutine has turned over once), and never longer than WARMUP_MAX_S. Then the window counts the
    answers that arrive in the next `window_s` seconds, whenever their call started; it is stretched
    until it holds `min_calls` answers (so slow systems are not measured on a handful), but never
    beyond WINDOW_MAX_S. Calls still running when it closes are awaited, not counted: ramp-up and
    drain stay out of the figure.
    """
    warmup = RunStats(concurrency)
    answers: list[tuple[float, float, str | None, Timings | None]] = []  # (when, latency, failure, timings)
    begin = time.perf_counter()
    opened: float | None = None

    def closed(now: float) -> bool:
        if opened is None:
            return now >= begin + WARMUP_MAX_S + WINDOW_MAX_S
        return (now >= opened + window_s and len(answers) >= min_calls) or now >= opened + WINDOW_MAX_S

    async def worker() -> None:
        nonlocal opened
        for _ in range(MAX_CALLS):
            if closed(time.perf_counter()):
                return
            latency_ms, failure, timings = await _attempt(call)
            now = time.perf_counter()
            if opened is None:
                _record(warmup, latency_ms, failure, timings)
                waited = now - begin
                if (warmup.calls >= warmup_calls or (waited >= warmup_s and warmup.calls >= concurrency)
                        or waited >= WARMUP_MAX_S):
                    opened = now
            else:
                answers.append((now, latency_ms, failure, timings))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    window = RunStats(concurrency)
    if opened is not None:
        ends = [when for when, *_ in answers]
        close = opened + WINDOW_MAX_S
        if len(ends) >= min_calls:
            close = min(close, max(opened + window_s, ends[min_calls - 1]))
        for when, latency_ms, failure, timings in answers:
            if when <= close:
                _record(window, latency_ms, failure, timings)
        window.elapsed_s = close - opened
    warmup.elapsed_s = (opened or time.perf_counter()) - begin
    return window, warmup


def perform_request(task: str, timeout_ms: int, options: Mapping[str, Any] | None = None, *,
                    fairness_key: str = "") -> bytes:
    request = PerformRequest(task=task, timeout_ms=timeout_ms, fairness_key=fairness_key)
    if options:
        request.options.update(dict(options))
    serialized: bytes = request.SerializeToString()
    return serialized


class RpcCall:
    """One unary call of Perform's method path with a fixed, pre-serialized request.

    The response is parsed as a PerformResponse in every case (the echo service's empty one too);
    a call fails if its gRPC status is not OK or the answer is not the one expected.
    """

    def __init__(
        self, channel: grpc.aio.Channel, request: bytes, *,
        expect_error: int = 0, expect_outcome: bool = True, timeout_s: float = 60.0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._method = channel.unary_unary(PERFORM_METHOD, request_serializer=None, response_deserializer=None)
        self._request = request
        self._metadata = metadata or None
        self._expect_error = expect_error
        self._expect_outcome = expect_outcome
        self._timeout_s = timeout_s

    async def __call__(self) -> Outcome:
        try:
            raw = await self._method(self._request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            return f"rpc {exc.code().name}", None
        response = PerformResponse.FromString(raw)
        timings = None
        if response.HasField("timings"):
            t = response.timings
            timings = (t.queue_ms, t.start_ms, t.run_ms, t.collect_ms)
        kind = response.error.kind if response.HasField("error") else 0
        if kind != self._expect_error:
            return ("task error " + TaskError.Kind.Name(kind)) if kind else "no task error", timings
        if not kind and response.outcome != self._expect_outcome:
            return f"outcome {str(response.outcome).lower()}", timings
        return None, timings


async def open_channel(target: str, timeout_s: float = 10.0, *, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to `target`, once connected. `own_connection`: not shared with the other channels to the
    same target (gRPC otherwise multiplexes every channel with the same arguments on one connection)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else None
    channel = grpc.aio.insecure_channel(target, options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
    except BaseException:
        await channel.close(None)
        raise
    return channel


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated between ranks; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def latency_summary(latencies_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(latencies_ms),
        "p50_ms": percentile(latencies_ms, 50),
        "p90_ms": percentile(latencies_ms, 90),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms) if latencies_ms else None,
        "mean_ms": statistics.fmean(latencies_ms) if latencies_ms else None,
    }


def timing_medians(stats: RunStats) -> dict[str, float | None]:
    """Medians of the daemon's timings, of the client's latency, and of what the timings leave out."""
    columns = list(zip(*stats.timings, strict=True)) if stats.timings else [() for _ in TIMING_NAMES]
    figures: dict[str, float | None] = {
        name: median(column) for name, column in zip(TIMING_NAMES, columns, strict=True)
    }
    figures["client_ms"] = median(stats.latencies_ms)
    # Per call, the client's latency minus the daemon's four parts: gRPC, (de)serialization, the client.
    if len(stats.timings) == len(stats.latencies_ms):
        rest = [lat - sum(t) for lat, t in zip(stats.latencies_ms, stats.timings, strict=True)]
        figures["outside_ms"] = median(rest)
    else:
        figures["outside_ms"] = None
    figures["n"] = len(stats.timings)
    return figures


def throughput_summary(runs: list[RunStats]) -> dict[str, Any]:
    """Median throughput of repeated runs, and what their pooled calls looked like."""
    pooled = merge(runs)
    return {
        "concurrency": pooled.concurrency,
        "repeats": [run.throughput for run in runs],
        "median": median(run.throughput for run in runs),
        "seconds": [run.elapsed_s for run in runs],
        "calls": pooled.calls,
        "failures": dict(pooled.failures),
        "latency": latency_summary(pooled.latencies_ms),
    }


def sample(values: list[float], limit: int) -> list[float]:
    """At most `limit` values that keep the distribution: every k-th of the sorted values."""
    ordered = sorted(values)
    step = max(1, math.ceil(len(ordered) / limit))
    return [round(v, 4) for v in ordered[::step]]

"""The sandbox's cost: the no-op task on two daemons of the same run, one with every part of its
[sandbox] on and one with every part off, in alternation: throughput at 32 in flight with the CPU
each process spends a task, and latency one call at a time.

The two daemons run the config every benchmark daemon runs with and differ only in [sandbox]. A
private filesystem leaves a task nothing writable but its own /tmp and the `writable` paths; the
no-op writes nothing, so none is listed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc.aio
import psutil

from bench import phases, procs
from bench.drivers import (
    Call,
    Outcome,
    RpcCall,
    RunStats,
    closed_loop,
    median,
    merge,
    open_channel,
    percentile,
    perform_request,
    throughput_summary,
)
from bench.settings import Progress, Settings

PARTS = {  # each daemon's [sandbox] table: every part on, every part off
    "sandboxed": {"filesystem": "private", "network": "none", "processes": "private", "syscalls": "default"},
    "unsandboxed": {"filesystem": "host", "network": "host", "processes": "host", "syscalls": "off"},
}
SIDES = tuple(PARTS)
CPU_KEYS = ("daemon", "forkserver", "task_process", "client", "server_total")
NOOP_TIMEOUT_MS = 10_000
# One call at a time back to back, the previous task's end and its replacement's setup share the CPU
# with the next call; after this pause they are done, as between the calls of a daemon not at its limit.
PAUSE_S = 0.02


def daemon_config(settings: Settings, side: str) -> dict[str, Any]:
    """The config of the other phases' daemons, with the side's [sandbox] table."""
    return {**procs.daemon_config(settings.max_running, settings.max_queued), "sandbox": dict(PARTS[side])}


class Counted:
    """A call that counts how often it is made: a window's CPU time is divided by every task it ran,
    those of its warm-up and those it awaited but did not count included."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.calls = 0

    async def __call__(self) -> Outcome:
        self.calls += 1
        return await self._call()


async def sandbox(daemons: dict[str, procs.Service], settings: Settings, progress: Progress) -> dict[str, Any]:
    """The phase, on `daemons` (a side each, started with daemon_config): the figures, JSON-ready."""
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        for side in SIDES:
            channels[side] = await open_channel(daemons[side].target(settings.transport))
        return await _measure(daemons, channels, settings, progress)
    finally:
        for channel in channels.values():
            await channel.close(None)


async def _measure(daemons: dict[str, procs.Service], channels: dict[str, grpc.aio.Channel], settings: Settings,
                   progress: Progress) -> dict[str, Any]:
    concurrency = settings.baseline_concurrency
    # Each side makes `latency_calls` calls one at a time in all, as in the latency phase.
    per_round = max(1, settings.latency_calls // settings.sandbox_repeats)
    calls = {side: RpcCall(channels[side], perform_request("noop", NOOP_TIMEOUT_MS)) for side in SIDES}
    me = psutil.Process()
    warmups = {side: await phases.warm_up(calls[side], settings) for side in SIDES}
    windows: dict[str, list[RunStats]] = {side: [] for side in SIDES}
    window_warmup_failures: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
    cpu: dict[str, list[dict[str, float | None]]] = {side: [] for side in SIDES}
    sequential: dict[str, list[RunStats]] = {side: [] for side in SIDES}
    paused: dict[str, list[RunStats]] = {side: [] for side in SIDES}
    # Both daemons are started once and reused, round after round, as the shared phases reuse theirs
    # and alternate windows: every window has its own warm-up, and a daemon's start (the fork server's
    # imports, its first spares) is not what is measured. Which side goes first alternates.
    for round_ in range(settings.sandbox_repeats):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            pid, counted = daemons[side].pid, Counted(calls[side])
            before = {"tasks": 0, **await phases.settled_footprint(pid), "client_cpu_s": phases.cpu_s(me)}
            windows[side].append(await phases.window(counted, concurrency, settings, window_warmup_failures[side]))
            client_cpu_s = phases.cpu_s(me)
            after = {"tasks": counted.calls, **await phases.settled_footprint(pid), "client_cpu_s": client_cpu_s}
            cpu[side].append(phases.cpu_per_task(before, after))
            sequential[side].append(await closed_loop(calls[side], 1, max_calls=per_round, max_seconds=60))
            paused[side].append(await closed_loop(calls[side], 1, max_calls=per_round // 2, max_seconds=60,
                                                  pause_s=PAUSE_S))
        progress.note(f"round {round_ + 1}: " + "; ".join(
            f"{side} {windows[side][-1].throughput:,.0f}/s, p50 {_percentiles(sequential[side][-1:], 50)[0]:.2f} ms"
            for side in SIDES))
    result: dict[str, Any] = {
        "concurrency": concurrency, "rounds": settings.sandbox_repeats, "calls_one_at_a_time_per_round": per_round,
        "daemon_config": {side: daemon_config(settings, side) for side in SIDES},
    }
    for side in SIDES:
        pooled, pooled_paused = merge(sequential[side]), merge(paused[side])
        p50s, p90s = _percentiles(sequential[side], 50), _percentiles(sequential[side], 90)
        result[side] = {
            "throughput": {**throughput_summary(windows[side]), "warmup_failures": dict(window_warmup_failures[side])},
            "cpu_ms_per_task": {key: median(v for r in cpu[side] if (v := r[key]) is not None) for key in CPU_KEYS},
            "cpu_ms_per_task_rounds": cpu[side],
            "one_at_a_time": {"n": pooled.calls, "p50_ms": median(p50s), "p90_ms": median(p90s),
                              "p50_ms_rounds": p50s, "p90_ms_rounds": p90s, "failures": dict(pooled.failures),
                              "warmup_failures": dict(warmups[side].failures)},
            "one_at_a_time_paused": {"n": pooled_paused.calls, "pause_ms": PAUSE_S * 1000,
                                     "p50_ms": median(_percentiles(paused[side], 50)),
                                     "p50_ms_rounds": _percentiles(paused[side], 50),
                                     "failures": dict(pooled_paused.failures), "warmup_failures": {}},
        }
    on, off = result["sandboxed"], result["unsandboxed"]
    result["throughput_ratio"] = _ratio(on["throughput"]["median"], off["throughput"]["median"])
    result["p50_ratio"] = _ratio(on["one_at_a_time"]["p50_ms"], off["one_at_a_time"]["p50_ms"])
    result["p50_paused_ratio"] = _ratio(on["one_at_a_time_paused"]["p50_ms"], off["one_at_a_time_paused"]["p50_ms"])
    progress.note(f"sandboxed / unsandboxed: throughput {result['throughput_ratio'] or 0:.2f}x, "
                  f"p50 one at a time {result['p50_ratio'] or 0:.2f}x back to back, "
                  f"{result['p50_paused_ratio'] or 0:.2f}x {PAUSE_S * 1000:.0f} ms apart")
    return result


def _percentiles(runs: list[RunStats], q: float) -> list[float]:
    """The q-th percentile of each run's latencies."""
    return [p for p in (percentile(run.latencies_ms, q) for run in runs) if p is not None]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None

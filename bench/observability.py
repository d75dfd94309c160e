"""What observability costs: the no-op task at 32 in flight, in alternating rounds, on three sides:

- `untraced`: a daemon as every phase runs it (the access log on, by default), calls without a trace
  context: the baseline;
- `traced`: the same daemon, each call carrying a W3C `traceparent` (no OpenTelemetry SDK in the
  daemon: it hands the caller's context to the task), which is all a traced caller costs a daemon
  that records no spans;
- `no_access_log`: a second daemon with `access_log = false`, calls without a trace context.

For each: the throughput and the CPU each process spends a task (the daemon's is what the access log
and the trace context add to), with ratios to `untraced` of the same run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc.aio
import psutil

from bench import phases, procs
from bench.drivers import RpcCall, RunStats, median, open_channel, perform_request, throughput_summary
from bench.sandbox import CPU_KEYS, NOOP_TIMEOUT_MS, Counted, _ratio
from bench.settings import Progress, Settings

SIDES = ("untraced", "traced", "no_access_log")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def daemon_configs(settings: Settings) -> dict[str, dict[str, Any]]:
    """The two daemons: as every phase's, and the same without the access log."""
    base = procs.daemon_config(settings.max_running, settings.max_queued)
    return {"default": base, "no_access_log": {**base, "access_log": False}}


async def observability(daemons: dict[str, procs.Service], settings: Settings, progress: Progress,
                        ) -> dict[str, Any]:
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        for name, daemon in daemons.items():
            channels[name] = await open_channel(daemon.target(settings.transport))
        request = perform_request("noop", NOOP_TIMEOUT_MS)
        calls = {"untraced": RpcCall(channels["default"], request),
                 "traced": RpcCall(channels["default"], request, metadata=(("traceparent", TRACEPARENT),)),
                 "no_access_log": RpcCall(channels["no_access_log"], request)}
        pids = {"untraced": daemons["default"].pid, "traced": daemons["default"].pid,
                "no_access_log": daemons["no_access_log"].pid}
        return await _measure(calls, pids, settings, progress)
    finally:
        for channel in channels.values():
            await channel.close(None)


async def _measure(calls: dict[str, RpcCall], pids: dict[str, int], settings: Settings, progress: Progress,
                   ) -> dict[str, Any]:
    me = psutil.Process()
    for call in calls.values():
        await phases.warm_up(call, settings)
    windows: dict[str, list[RunStats]] = {side: [] for side in SIDES}
    warmup_failures: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
    cpu: dict[str, list[dict[str, float | None]]] = {side: [] for side in SIDES}
    for round_ in range(settings.sandbox_repeats):
        order = SIDES[round_ % len(SIDES):] + SIDES[:round_ % len(SIDES)]  # each side goes first in turn
        for side in order:
            counted = Counted(calls[side])
            before = {"tasks": 0, **await phases.settled_footprint(pids[side]), "client_cpu_s": phases.cpu_s(me)}
            windows[side].append(await phases.window(counted, settings.baseline_concurrency, settings,
                                                     warmup_failures[side]))
            client_cpu_s = phases.cpu_s(me)
            after = {"tasks": counted.calls, **await phases.settled_footprint(pids[side]), "client_cpu_s": client_cpu_s}
            cpu[side].append(phases.cpu_per_task(before, after))
        progress.note(f"round {round_ + 1}: " + "; ".join(
            f"{side} {windows[side][-1].throughput:,.0f}/s, daemon {cpu[side][-1]['daemon'] or 0:.2f} ms/task"
            for side in SIDES))
    result: dict[str, Any] = {"concurrency": settings.baseline_concurrency, "rounds": settings.sandbox_repeats}
    for side in SIDES:
        result[side] = {
            "throughput": {**throughput_summary(windows[side]), "warmup_failures": dict(warmup_failures[side])},
            "cpu_ms_per_task": {key: median(v for r in cpu[side] if (v := r[key]) is not None) for key in CPU_KEYS},
            "cpu_ms_per_task_rounds": cpu[side],
        }
    base = result["untraced"]
    for side in SIDES[1:]:
        result[f"{side}_throughput_ratio"] = _ratio(result[side]["throughput"]["median"], base["throughput"]["median"])
        result[f"{side}_daemon_cpu_ratio"] = _ratio(result[side]["cpu_ms_per_task"]["daemon"],
                                                    base["cpu_ms_per_task"]["daemon"])
    progress.note("vs untraced: " + "; ".join(
        f"{side} throughput {result[f'{side}_throughput_ratio'] or 0:.2f}x, daemon CPU/task "
        f"{result[f'{side}_daemon_cpu_ratio'] or 0:.2f}x" for side in SIDES[1:]))
    return result

"""The measurements, one function per phase; each returns plain, JSON-ready figures.

Every figure is a median over repeated runs, each run warmed up first, and every loop is bounded
in calls and in time. Echo and Perform runs alternate (and alternate which goes first), so the
noise of a shared machine falls on both alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc.aio
import psutil

from bench import procs
from bench.baselines import FreshInterpreter, ProcessPerTaskPool
from bench.drivers import (
    Call,
    RpcCall,
    RunStats,
    closed_loop,
    latency_summary,
    median,
    merge,
    percentile,
    perform_request,
    sample,
    steady_window,
    throughput_summary,
    timing_medians,
)
from bench.settings import Progress, Settings
from task_runner.v1.task_runner_pb2 import TaskError

NOOP_TIMEOUT_MS = 10_000
SAMPLES_KEPT = 4000  # per-call latencies kept in the results for each plotted distribution


async def warm_up(call: Call, settings: Settings) -> RunStats:
    """Calls one at a time before a latency measurement."""
    return await closed_loop(call, 1, max_calls=settings.warmup_calls, max_seconds=max(settings.warmup_s, 5.0))


async def window(call: Call, concurrency: int, settings: Settings, warmup_failures: Counter[str],
                 window_s: float | None = None) -> RunStats:
    """One throughput window, after its own warm-up at the same concurrency (whose failures are tallied)."""
    measured, warmup = await steady_window(
        call, concurrency, warmup_calls=settings.warmup_calls, warmup_s=settings.warmup_s,
        window_s=settings.window_s if window_s is None else window_s,
        min_calls=max(settings.window_min_calls, settings.window_min_per_flight * concurrency),
    )
    warmup_failures.update(warmup.failures)
    return measured


def _noop_calls(echo: grpc.aio.Channel, daemon: grpc.aio.Channel) -> dict[str, RpcCall]:
    """The same client code for both: only the channel and the expected answer differ."""
    return {
        "echo": RpcCall(echo, perform_request("noop", NOOP_TIMEOUT_MS), expect_outcome=False),  # an empty answer
        "perform": RpcCall(daemon, perform_request("noop", NOOP_TIMEOUT_MS), expect_outcome=True),
    }


async def latency(echo: grpc.aio.Channel, daemon: grpc.aio.Channel, settings: Settings) -> dict[str, Any]:
    """One call at a time: echo and Perform alternate in blocks until each has made `latency_calls`."""
    calls = _noop_calls(echo, daemon)
    warmups = {name: await warm_up(call, settings) for name, call in calls.items()}
    runs: dict[str, list[RunStats]] = {name: [] for name in calls}
    blocks = -(-settings.latency_calls // settings.latency_block)
    for block in range(blocks):
        order = list(calls) if block % 2 == 0 else list(reversed(calls))
        size = min(settings.latency_block, settings.latency_calls - block * settings.latency_block)
        for name in order:
            runs[name].append(await closed_loop(calls[name], 1, max_calls=size, max_seconds=60))
    result = {}
    for name, stats in runs.items():
        pooled = merge(stats)
        result[name] = {
            **latency_summary(pooled.latencies_ms),
            "failures": dict(pooled.failures),
            "warmup_failures": dict(warmups[name].failures),
            "samples_ms": sample(pooled.latencies_ms, SAMPLES_KEPT),
        }
        if pooled.timings:
            result[name]["timings"] = timing_medians(pooled)
    return result


async def throughput(
    echo: grpc.aio.Channel, daemon: grpc.aio.Channel, settings: Settings, progress: Progress,
) -> dict[str, Any]:
    """Calls per second at each level of calls in flight, echo and Perform alternating window by window."""
    calls = _noop_calls(echo, daemon)
    result: dict[str, Any] = {name: {} for name in calls}
    timings: dict[str, Any] = {}
    for level in settings.levels:
        warmup_failures: dict[str, Counter[str]] = {name: Counter() for name in calls}
        runs: dict[str, list[RunStats]] = {name: [] for name in calls}
        for repeat in range(settings.repeats):
            for name in list(calls) if repeat % 2 == 0 else list(reversed(calls)):
                runs[name].append(await window(calls[name], level, settings, warmup_failures[name]))
        for name, stats in runs.items():
            summary = throughput_summary(stats)
            summary["warmup_failures"] = dict(warmup_failures[name])
            if level == settings.baseline_concurrency:
                summary["samples_ms"] = sample(merge(stats).latencies_ms, SAMPLES_KEPT)
            result[name][str(level)] = summary
        timings[str(level)] = timing_medians(merge(runs["perform"]))
        echo_rate, perform_rate = result["echo"][str(level)]["median"], result["perform"][str(level)]["median"]
        progress.note(f"{level:>3} in flight: echo {echo_rate:,.0f}/s, Perform no-op {perform_rate:,.0f}/s")
    return {"echo": result["echo"], "perform": result["perform"], "timings": timings}


async def sleep10(daemon: grpc.aio.Channel, settings: Settings) -> dict[str, Any]:
    """The 10 ms task at `baseline_concurrency` in flight; ideal = max_running / 10 ms."""
    call = RpcCall(daemon, perform_request("sleep10", NOOP_TIMEOUT_MS))
    concurrency = settings.baseline_concurrency
    warmup_failures: Counter[str] = Counter()
    runs = [await window(call, concurrency, settings, warmup_failures) for _ in range(settings.repeats)]
    summary = throughput_summary(runs)
    ideal = min(concurrency, settings.max_running) / 0.010
    return {
        **summary,
        "ideal": ideal,
        "ratio_to_ideal": summary["median"] / ideal if summary["median"] is not None else None,
        "timings": timing_medians(merge(runs)),
        "warmup_failures": dict(warmup_failures),
    }


WORK_MS = {"noop": 0, "sleep10": 10, "sleep100": 100}  # the bench tasks, by how long each one's work lasts
WORK_LEVELS = (1, 4, 16, 64)


async def work_scale(daemon: grpc.aio.Channel, settings: Settings, progress: Progress) -> dict[str, Any]:
    """Throughput and p50 as the work of a task (0, 10, 100 ms asleep) and the calls in flight (1, 4, 16, 64)
    grow: what a call costs beyond its work (p50 - work, one in flight) and the share of the ideal
    (min(in flight, max_running) / work) it reaches, so that the cost of a task is seen beside its work."""
    result: dict[str, Any] = {}
    for task, work_ms in WORK_MS.items():
        call = RpcCall(daemon, perform_request(task, NOOP_TIMEOUT_MS))
        rows: dict[str, Any] = {}
        for level in WORK_LEVELS:
            failures: Counter[str] = Counter()
            stats = await window(call, level, settings, failures)
            summary = throughput_summary([stats])
            p50 = summary["latency"]["p50_ms"]
            ideal = min(level, settings.max_running) / (work_ms / 1000) if work_ms else None
            rows[str(level)] = {
                "tasks_per_s": summary["median"], "p50_ms": p50, "failures": summary["failures"],
                "beyond_work_ms": p50 - work_ms if p50 is not None else None, "ideal_per_s": ideal,
                "share_of_ideal": summary["median"] / ideal if ideal and summary["median"] is not None else None,
            }
        result[task] = {"work_ms": work_ms, "levels": rows}
        progress.note(f"{task}: " + ", ".join(f"{level} in flight {rows[str(level)]['tasks_per_s'] or 0:,.0f}/s"
                                               for level in WORK_LEVELS))
    return result


async def fork_floor(settings: Settings) -> dict[str, Any]:
    """The fork floor (bench/fork_floor.py): a fork per no-op task with the fork server's preloads,
    2 x CPUs in flight, the answer read from a pipe, the child reaped; `repeats` windows."""
    in_flight = 2 * (os.cpu_count() or 1)
    runs = []
    for _ in range(settings.repeats):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fork_floor", str(settings.window_s), str(in_flight),
            json.dumps(procs.BENCH_TASKS), cwd=procs.REPO, stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"bench.fork_floor exited with code {process.returncode}")
        runs.append(json.loads(out)["per_s"])
    return {"in_flight": in_flight, "runs": runs, "median": statistics.median(runs)}


async def baselines(daemon: grpc.aio.Channel, settings: Settings, progress: Progress) -> dict[str, Any]:
    """The same no-op, one fresh process per task: one call at a time, then at `baseline_concurrency` in flight.

    Each baseline window is paired with a Perform no-op window next to it (which goes first
    alternates), and the ratio is taken pair by pair, so a change of load between phases does not
    tilt it.
    """
    concurrency = settings.baseline_concurrency
    perform = RpcCall(daemon, perform_request("noop", NOOP_TIMEOUT_MS))
    result: dict[str, Any] = {}
    makers: dict[str, Callable[[], FreshInterpreter | ProcessPerTaskPool]] = {
        "fresh_interpreter": FreshInterpreter,
        "process_pool": lambda: ProcessPerTaskPool(concurrency),
    }
    for name, make in makers.items():
        system = make()
        warmup_failures: Counter[str] = Counter()
        perform_warmup_failures: Counter[str] = Counter()
        runs: list[RunStats] = []
        perform_runs: list[RunStats] = []
        try:
            sequential = await closed_loop(
                system, 1, max_calls=settings.baseline_sequential_calls, max_seconds=30,
            )
            for repeat in range(settings.repeats):
                if repeat % 2 == 0:
                    perform_runs.append(await window(perform, concurrency, settings, perform_warmup_failures))
                runs.append(await window(system, concurrency, settings, warmup_failures, settings.baseline_window_s))
                if repeat % 2 == 1:
                    perform_runs.append(await window(perform, concurrency, settings, perform_warmup_failures))
        finally:
            await asyncio.wait_for(asyncio.to_thread(system.close), 60)
        summary = throughput_summary(runs)
        ratios = [p.throughput / b.throughput for p, b in zip(perform_runs, runs, strict=True) if b.throughput > 0]
        alongside = throughput_summary(perform_runs)
        alongside["warmup_failures"] = dict(perform_warmup_failures)
        summary.update({
            "label": system.label,
            "sequential": {**latency_summary(sequential.latencies_ms), "failures": dict(sequential.failures),
                           "samples_ms": sample(sequential.latencies_ms, SAMPLES_KEPT)},
            "samples_ms": sample(merge(runs).latencies_ms, SAMPLES_KEPT),
            "warmup_failures": dict(warmup_failures),
            "perform_alongside": alongside,
            "paired_ratios": ratios,
            "ratio": median(ratios),
        })
        if isinstance(system, ProcessPerTaskPool):
            summary["start_method"] = system.start_method
        result[name] = summary
        progress.note(f"{system.label}: {summary['median']:,.1f} tasks/s at {concurrency} in flight "
                      f"(Perform beside it: {alongside['median']:,.0f}/s), "
                      f"{summary['sequential']['p50_ms']:.1f} ms one at a time")
    return result


async def deadline(
    daemon: grpc.aio.Channel, settings: Settings, directory: Path, started_at: float, strays: list[int],
) -> dict[str, Any]:
    """The stubborn task under a 100 ms timeout, one at a time: answer time past the timeout, processes left."""
    directory.mkdir(parents=True, exist_ok=True)
    overshoots: list[float] = []
    gone_after: list[float] = []
    left_behind: list[int] = []
    pids_seen: list[int] = []
    failures: dict[str, int] = {}
    runs = settings.deadline_warmup_runs + settings.deadline_runs
    for i in range(runs):
        pidfile = directory / f"stubborn-{i}.pids"
        request = perform_request("stubborn", settings.deadline_timeout_ms, {"pidfile": str(pidfile)})
        call = RpcCall(daemon, request, expect_error=TaskError.Kind.TIMEOUT, timeout_s=30)
        stats = await closed_loop(call, 1, max_calls=1, max_seconds=60)
        answered = time.perf_counter()
        pids = [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []
        left = await asyncio.to_thread(procs.wait_gone, pids, 5.0)
        all_gone_ms = (time.perf_counter() - answered) * 1e3
        if left:
            left_behind += left
            strays += procs.kill_own(left, started_at)
        for failure, count in stats.failures.items():
            failures[failure] = failures.get(failure, 0) + count
        if i < settings.deadline_warmup_runs:
            continue
        pids_seen.append(len(pids))
        overshoots.append(stats.latencies_ms[0] - settings.deadline_timeout_ms)
        if not left:
            gone_after.append(all_gone_ms)
    return {
        "timeout_ms": settings.deadline_timeout_ms,
        "runs": settings.deadline_runs,
        "warmup_runs": settings.deadline_warmup_runs,
        "overshoot_ms": {
            "median": percentile(overshoots, 50), "p99": percentile(overshoots, 99),
            "max": max(overshoots, default=None), "min": min(overshoots, default=None),
            "samples": [round(v, 3) for v in overshoots],
        },
        "tree_gone_after_answer_ms": {"median": percentile(gone_after, 50), "max": max(gone_after, default=None)},
        "pids_per_run": {"min": min(pids_seen, default=0), "max": max(pids_seen, default=0)},
        "left_behind": len(left_behind),
        "left_behind_pids": left_behind,
        "failures": failures,
    }


async def leanness(daemon: procs.Service, channel: grpc.aio.Channel, settings: Settings,
                   progress: Progress) -> dict[str, Any]:
    """No-op tasks at `lean_concurrency` in flight on a fresh daemon; its footprint at each checkpoint."""
    call = RpcCall(channel, perform_request("noop", NOOP_TIMEOUT_MS))
    me = psutil.Process()
    checkpoints = [{"tasks": 0, **await settled_footprint(daemon.pid), "client_cpu_s": cpu_s(me)}]
    done = 0
    runs: list[RunStats] = []
    deadline = time.monotonic() + settings.lean_max_s
    for target in settings.lean_checkpoints:
        stats = await closed_loop(call, settings.lean_concurrency, max_calls=target - done,
                                  max_seconds=max(0.0, deadline - time.monotonic()))
        runs.append(stats)
        done += stats.calls
        client_cpu_s = cpu_s(me)
        checkpoints.append({"tasks": done, "throughput": stats.throughput, **await settled_footprint(daemon.pid),
                            "client_cpu_s": client_cpu_s})
        last = checkpoints[-1]
        progress.note(f"after {done:>6,} tasks: RSS {last['rss_mib']:.1f} MiB, {last['threads']:.0f} threads, "
                      f"{last['fds']:.0f} fds ({stats.throughput:,.0f} tasks/s)")
        if done < target:
            progress.note(f"out of time ({settings.lean_max_s:.0f} s) before {target:,} tasks: stopping here")
            break
    pooled = merge(runs)
    return {
        "concurrency": settings.lean_concurrency,
        "checkpoints": checkpoints,
        "tasks": done,
        "throughput": pooled.ok / pooled.elapsed_s if pooled.elapsed_s else None,
        "cpu_ms_per_task": cpu_per_task(checkpoints[1] if len(checkpoints) > 2 else checkpoints[0], checkpoints[-1]),
        "failures": dict(pooled.failures),
    }


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def cpu_per_task(first: dict[str, float], last: dict[str, float]) -> dict[str, float | None]:
    """CPU milliseconds per task between two checkpoints: daemon, fork server, task processes, the client."""
    tasks = last["tasks"] - first["tasks"]
    keys = {"daemon": "cpu_s", "forkserver": "forkserver_cpu_s", "task_process": "tasks_cpu_s",
            "client": "client_cpu_s"}
    figures: dict[str, float | None] = {
        name: (last[key] - first[key]) / tasks * 1e3 if tasks > 0 and key in first and key in last else None
        for name, key in keys.items()
    }
    server_side = [figures[name] for name in ("daemon", "forkserver", "task_process")]
    figures["server_total"] = sum(v for v in server_side if v is not None) if None not in server_side else None
    return figures


async def settled_footprint(pid: int) -> dict[str, float]:
    """The median of three footprints taken after the last tasks' processes have had time to be reaped."""
    await asyncio.sleep(0.3)
    samples = []
    for _ in range(3):
        samples.append(await asyncio.to_thread(procs.footprint, pid))
        await asyncio.sleep(0.1)
    return {key: statistics.median(s[key] for s in samples if key in s) for key in samples[-1]}

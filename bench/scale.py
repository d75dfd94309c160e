"""Admission at scale: a no-op Perform's latency, one call at a time, while 100,000 real calls wait under
as many fairness keys for a task held by its own `max_running = 1`; against the same latency with
nothing waiting, on the same daemon, in the same run.

The daemon is one of its own (`max_queued` and `max_pending_rpcs` above the calls that wait, a
`metrics_listen` port to read how many wait). The waiting calls go out on one grpc.aio channel; the
measured calls on a channel with a connection of its own, as another client's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc.aio
import psutil

from bench import procs
from bench.drivers import (
    PERFORM_METHOD,
    RpcCall,
    closed_loop,
    latency_summary,
    median,
    open_channel,
    perform_request,
    sample,
)
from bench.settings import Progress, Settings

HOLD_TASK, HOLD_TIMEOUT_MS = "hold", 3_600_000  # the daemon's default max_timeout_ms
NOOP_TIMEOUT_MS = 10_000
WAIT_RPC_TIMEOUT_S = 3_600.0  # the waiting calls' own deadline: beyond the phase
FILL_BATCH = 1_000  # calls started before the loop is let to send them
# Calls sent ahead of those the daemon has queued. gRPC cancels a call the daemon has not picked up
# within 30 s (grpc.server_max_unrequested_time_in_server), and the daemon takes ~1 ms of CPU to
# queue each: a burst of 100,000 would lose its tail.
FILL_AHEAD = 5_000
FILL_MAX_S = 600.0  # the fill stops here, at whatever count it reached
LEAVE_MAX_S = 120.0
SCRAPE_EVERY_S = 0.25
MIB = 1 << 20
SAMPLES_KEPT = 2000


def daemon_config(settings: Settings, metrics_port: int) -> str:
    """The phase's daemon: room for every waiting call, the no-op task and `hold` (one at a time)."""
    waiting = settings.scale_waiting
    return "\n".join([
        f"max_running = {settings.max_running}",
        f"max_queued = {waiting + 1024}",
        # The daemon counts each waiting call's request and a fixed share for the call itself (tens of
        # KiB: gRPC's call, the execution, its coroutines): room for all of them, at 64 KiB each.
        f"max_queued_bytes = {(waiting + 1024) * (64 << 10)}",
        f"max_pending_rpcs = {waiting + 10_000}",  # the whole fill may be in gRPC's hands at once
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_daemon(directory: Path, config: str) -> procs.Service:
    """`python -m task_runner.server` with the phase's config, as procs.start_daemon starts the others."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(config)
    argv = [
        sys.executable, "-m", "task_runner.server", "--config", str(path),
        "--listen", f"unix:{directory / 'daemon.sock'}", "--listen", "127.0.0.1:0",
    ]
    daemon = procs.start_service("daemon", argv, directory)
    forkserver = procs.forkserver_of(daemon.pid)
    if forkserver is not None:
        daemon.companions.append(forkserver)
    daemon.facts["task_cgroups"] = procs.task_cgroup_base(daemon.pid)
    daemon.facts["forkserver_pid"] = forkserver.pid if forkserver is not None else None
    return daemon


class Gauges:
    """The daemon's `task_runner_tasks_queued` and `_running`, read from its metrics endpoint."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy

    def _read(self) -> dict[str, float]:
        with self._opener.open(self._url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("task_runner_tasks_queued", "task_runner_tasks_running"):
                values[name.removeprefix("task_runner_tasks_")] = float(value)
        return values

    async def read(self) -> dict[str, float]:
        return await asyncio.to_thread(self._read)

    async def wait(self, done: Callable[[dict[str, float]], bool], timeout_s: float,
                   give_up: Callable[[], bool] = lambda: False) -> tuple[dict[str, float], float]:
        """Read every SCRAPE_EVERY_S until `done` (or `give_up`, or the timeout): the last values, the time taken."""
        begin = time.perf_counter()
        while True:
            values = await self.read()
            elapsed = time.perf_counter() - begin
            if done(values) or give_up() or elapsed >= timeout_s:
                return values, elapsed
            await asyncio.sleep(SCRAPE_EVERY_S)


def _rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MIB


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _latency(call: RpcCall, settings: Settings) -> tuple[dict[str, Any], list[float]]:
    """`scale_latency_calls` calls one at a time, after a warm-up: their summary, and their latencies."""
    warmup = await closed_loop(call, 1, max_calls=settings.warmup_calls, max_seconds=max(settings.warmup_s, 5.0))
    stats = await closed_loop(call, 1, max_calls=settings.scale_latency_calls, max_seconds=120)
    summary = {**latency_summary(stats.latencies_ms), "failures": dict(stats.failures),
               "warmup_failures": dict(warmup.failures), "samples_ms": sample(stats.latencies_ms, SAMPLES_KEPT)}
    return summary, stats.latencies_ms


async def admission_scale(daemon: procs.Service, metrics_port: int, config: str, settings: Settings,
                          progress: Progress) -> dict[str, Any]:
    """The phase, on `daemon` (started with `config`, from daemon_config): the figures, JSON-ready."""
    result: dict[str, Any] = {"waiting_target": settings.scale_waiting, "daemon_config": config}
    target = daemon.target(settings.transport)
    fill_channel = await open_channel(target)
    probe_channel = await open_channel(target, own_connection=True)
    try:
        await _measure(fill_channel, probe_channel, daemon, Gauges(metrics_port), settings, progress, result)
    finally:
        await fill_channel.close(None)
        await probe_channel.close(None)
    return result


async def _measure(fill_channel: grpc.aio.Channel, probe_channel: grpc.aio.Channel, daemon: procs.Service,
                   gauges: Gauges, settings: Settings, progress: Progress, result: dict[str, Any]) -> None:
    method = fill_channel.unary_unary(PERFORM_METHOD, request_serializer=None, response_deserializer=None)
    probe = RpcCall(probe_channel, perform_request("noop", NOOP_TIMEOUT_MS))
    me = psutil.Process()

    # The task's one turn, taken for the whole phase.
    hold = method(perform_request(HOLD_TASK, HOLD_TIMEOUT_MS, {"seconds": 3600.0}), timeout=WAIT_RPC_TIMEOUT_S)
    values, _ = await gauges.wait(lambda v: v.get("running") == 1, 30, hold.done)
    if values.get("running") != 1:
        raise RuntimeError(f"the {HOLD_TASK} task did not start: {values}")

    result["empty"], empty = await _latency(probe, settings)
    progress.note(f"nothing waiting: p50 {result['empty']['p50_ms']:.2f} ms")

    count = settings.scale_waiting
    before = {"daemon_rss_mib": _rss_mib(daemon.pid), "daemon_cpu_s": _cpu_s(daemon.pid),
              "client_rss_mib": _rss_mib(me.pid)}
    calls: list[grpc.aio.UnaryUnaryCall[bytes, bytes]] = []

    def ended_early() -> bool:  # a waiting call was answered (refused, cancelled by gRPC): the fill is off
        return hold.done() or any(call.done() for call in calls[::97])

    begin = time.perf_counter()
    while len(calls) < count and time.perf_counter() - begin < FILL_MAX_S and not ended_early():
        queued = int((await gauges.read()).get("queued", 0))
        for _ in range(min(count - len(calls), FILL_AHEAD - (len(calls) - queued))):
            # Each under a key of its own; one that ever ran would end at once.
            request = perform_request(HOLD_TASK, HOLD_TIMEOUT_MS, {"seconds": 0.0},
                                      fairness_key=f"tenant-{len(calls)}")
            calls.append(method(request, timeout=WAIT_RPC_TIMEOUT_S))
            if len(calls) % FILL_BATCH == 0:
                await asyncio.sleep(0)  # let the channel send them
        await asyncio.sleep(SCRAPE_EVERY_S)
    sent_s = time.perf_counter() - begin
    values, waited_s = await gauges.wait(lambda v: v.get("queued", 0) >= len(calls),
                                         max(0.0, FILL_MAX_S - sent_s), ended_early)
    fill_s = sent_s + waited_s
    after = {"daemon_rss_mib": _rss_mib(daemon.pid), "daemon_cpu_s": _cpu_s(daemon.pid),
             "client_rss_mib": _rss_mib(me.pid)}
    waiting = int(values.get("queued", 0))
    ended = sum(call.done() for call in calls)
    result["fill"] = {
        "calls_sent": len(calls), "waiting": waiting, "ended_early": ended, "sent_s": sent_s, "seconds": fill_s,
        "per_s": waiting / fill_s if fill_s else None,
        "daemon_rss_mib": [before["daemon_rss_mib"], after["daemon_rss_mib"]],
        "daemon_kib_per_call": (after["daemon_rss_mib"] - before["daemon_rss_mib"]) * 1024 / waiting
        if waiting else None,
        "daemon_cpu_s": after["daemon_cpu_s"] - before["daemon_cpu_s"],
        "client_rss_mib": [before["client_rss_mib"], after["client_rss_mib"]],
    }
    progress.note(f"filled: {waiting:,} of {count:,} calls waiting after {fill_s:.1f} s; daemon RSS "
                  f"{before['daemon_rss_mib']:.0f} -> {after['daemon_rss_mib']:.0f} MiB, this client's "
                  f"{before['client_rss_mib']:.0f} -> {after['client_rss_mib']:.0f} MiB")
    if not waiting:
        raise RuntimeError(f"none of {count:,} calls waited ({ended:,} answered early)")
    if waiting < count or ended:  # measured all the same, with what waits: the report says how many
        progress.note(f"only {waiting:,} of {count:,} calls wait ({ended:,} answered early)")

    result["loaded"], loaded = await _latency(probe, settings)
    values = await gauges.read()
    result["loaded"]["waiting_after"] = int(values.get("queued", 0))
    progress.note(f"{waiting:,} waiting: p50 {result['loaded']['p50_ms']:.2f} ms "
                  f"({result['loaded']['waiting_after']:,} still waiting after)")

    # Every waiting caller leaves: each is out of the queue at once (and its ticket freed).
    begin = time.perf_counter()
    for call in calls:
        call.cancel()
    values, _ = await gauges.wait(lambda v: v.get("queued", 1) == 0, LEAVE_MAX_S)
    result["leave"] = {"seconds": time.perf_counter() - begin, "left_waiting": int(values.get("queued", 0)),
                       "daemon_rss_mib": _rss_mib(daemon.pid)}
    hold.cancel()
    await gauges.wait(lambda v: v.get("running", 1) == 0, 30)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*calls, hold, return_exceptions=True)
    result["empty_after"], empty_after = await _latency(probe, settings)

    # The reference: the calls with nothing waiting before the fill and after it, pooled, so that a
    # change of the machine's load over the phase falls on both sides alike.
    reference, with_waiting = median(empty + empty_after), median(loaded)
    result["empty_pooled_p50_ms"] = reference
    result["ratio"] = with_waiting / reference if with_waiting is not None and reference else None
    progress.note(f"queue emptied in {result['leave']['seconds']:.1f} s; nothing waiting again: p50 "
                  f"{result['empty_after']['p50_ms']:.2f} ms; with {waiting:,} waiting / with none: "
                  f"{result['ratio']:.2f}x")

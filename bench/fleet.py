"""One daemon against two on this machine: the no-op task at 32 in flight, in alternating rounds.

`one`: a daemon as every phase runs it, called over one channel. `two`: two such daemons (each with
half the slots, so that the machine runs as many tasks at once), called over one fleet channel, the
Python client's: ring_hash on `task-runner-request-id` with client-side health. Every call of
either side carries a fresh request id in that header (as the Python client's calls do), so both
sides pay for the idempotency cache alike. On a machine of 2 cores two daemons cannot bring more
throughput; what they should show is no loss, and the busiest process's CPU per task halving (the
figure that caps one daemon on a larger machine).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from typing import Any

import grpc.aio

from bench import phases, procs
from bench.drivers import Outcome, RpcCall, RunStats, median, open_channel, perform_request, throughput_summary
from bench.sandbox import NOOP_TIMEOUT_MS, Counted, _ratio
from bench.settings import Progress, Settings
from task_runner.client.channel import FLEET_SERVICE_CONFIG, REQUEST_ID_HEADER, RING_HASH_ENV

SIDES = ("one", "two")


def daemon_config(settings: Settings, daemons: int) -> dict[str, Any]:
    return procs.daemon_config(max(1, settings.max_running // daemons), settings.max_queued)


class Identified:
    """A Perform of the no-op with a fresh request id in the header each time (the field left empty)."""

    def __init__(self, channel: grpc.aio.Channel, prefix: str) -> None:
        self._call = RpcCall(channel, perform_request("noop", NOOP_TIMEOUT_MS))
        self._ids = (f"{prefix}-{n}" for n in itertools.count())

    async def __call__(self) -> Outcome:
        self._call._metadata = ((REQUEST_ID_HEADER, next(self._ids)),)
        return await self._call()


async def fleet(one: procs.Service, two: list[procs.Service], settings: Settings, progress: Progress,
                ) -> dict[str, Any]:
    os.environ.setdefault(RING_HASH_ENV, "true")
    single = await open_channel(one.target(settings.transport))
    addresses = ",".join(service.target("tcp").removeprefix("ipv4:") for service in two)
    pair = grpc.aio.insecure_channel(f"ipv4:{addresses}", options=[
        ("grpc.service_config", json.dumps(FLEET_SERVICE_CONFIG))])
    try:
        calls = {"one": Identified(single, "one"), "two": Identified(pair, "two")}
        pids = {"one": [one.pid], "two": [service.pid for service in two]}
        return await _measure(calls, pids, settings, progress)
    finally:
        await single.close(None)
        await pair.close(None)


async def _measure(calls: dict[str, Identified], pids: dict[str, list[int]], settings: Settings,
                   progress: Progress) -> dict[str, Any]:
    for call in calls.values():
        await phases.warm_up(call, settings)
    windows: dict[str, list[RunStats]] = {side: [] for side in SIDES}
    warmup_failures: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
    busiest: dict[str, list[float]] = {side: [] for side in SIDES}
    total: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(settings.sandbox_repeats):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            counted = Counted(calls[side])
            before = [await phases.settled_footprint(pid) for pid in pids[side]]
            windows[side].append(await phases.window(counted, settings.baseline_concurrency, settings,
                                                     warmup_failures[side]))
            after = [await phases.settled_footprint(pid) for pid in pids[side]]
            per_process = []  # each daemon's and each fork server's CPU per task of the side, in ms
            for first, last in zip(before, after, strict=True):
                for key in ("cpu_s", "forkserver_cpu_s"):
                    if key in first and key in last and counted.calls:
                        per_process.append((last[key] - first[key]) / counted.calls * 1e3)
            busiest[side].append(max(per_process, default=0.0))
            total[side].append(sum(per_process))
        progress.note(f"round {round_ + 1}: " + "; ".join(
            f"{side} {windows[side][-1].throughput:,.0f}/s, busiest process {busiest[side][-1]:.2f} ms/task"
            for side in SIDES))
    result: dict[str, Any] = {"concurrency": settings.baseline_concurrency, "rounds": settings.sandbox_repeats}
    for side in SIDES:
        result[side] = {
            "throughput": {**throughput_summary(windows[side]), "warmup_failures": dict(warmup_failures[side])},
            "busiest_process_cpu_ms_per_task": median(busiest[side]),
            "daemons_and_fork_servers_cpu_ms_per_task": median(total[side]),
            "busiest_rounds": busiest[side],
        }
    result["throughput_ratio"] = _ratio(result["two"]["throughput"]["median"], result["one"]["throughput"]["median"])
    result["busiest_ratio"] = _ratio(result["two"]["busiest_process_cpu_ms_per_task"],
                                     result["one"]["busiest_process_cpu_ms_per_task"])
    progress.note(f"two daemons / one: throughput {result['throughput_ratio'] or 0:.2f}x, busiest process's CPU "
                  f"per task {result['busiest_ratio'] or 0:.2f}x")
    return result

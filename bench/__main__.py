"""`python -m bench [--quick] [--only PHASE,...]`: run the phases, print the table, write JSON and a chart.

Run it from the repository root, with the package installed (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import big_requests, fleet, observability, phases, procs, report, sandbox, scale
from bench.drivers import open_channel
from bench.settings import Progress, Settings

RESULTS = Path(__file__).resolve().parent / "results"
# The phases, in the order they run; those before leanness share one daemon (and the echo service).
SHARED = ("latency", "throughput", "sleep10", "work_scale", "fork_floor", "baselines", "deadline")
PHASE_NAMES = (*SHARED, "leanness", "admission_scale", "sandbox", "observability", "fleet", "big_requests")


def phase_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PHASE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase {', '.join(unknown) or '(none)'}; "
                                         f"choose among {', '.join(PHASE_NAMES)}")
    return tuple(name for name in PHASE_NAMES if name in names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run under a minute: fewer calls and repeats")
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                        help="call the echo service and the daemon over loopback TCP (default) or a unix socket")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where latest.json and latency.png go ({RESULTS})")
    parser.add_argument("--only", type=phase_list, default=(), metavar="PHASE,...",
                        help=f"run only these phases ({', '.join(PHASE_NAMES)}); the results go to "
                             "only-PHASE-....json and .png beside latest.json, which stays as it was")
    return parser.parse_args(argv)


def machine_facts() -> dict[str, Any]:
    import grpc
    from google import protobuf

    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "kernel": platform.release(),
        "uname": " ".join(platform.uname()),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "loadavg_start": os.getloadavg()[0],
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        facts["cpu_model"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                   if line.startswith("model name")), "?")
    with contextlib.suppress(OSError):
        meminfo = Path("/proc/meminfo").read_text().split()
        facts["mem_total_mib"] = int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(procs.REPO), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        facts["git_commit"] = git("rev-parse", "--short", "HEAD")
        facts["git_dirty"] = bool(git("status", "--porcelain", "--", "src", "protos"))
    return facts


def service_facts(service: procs.Service) -> dict[str, Any]:
    every = service.log_lines()
    lines = [line for line in every if " task_runner.access: " not in line]  # the access log: a line per call
    return {"pid": service.pid, **service.facts, "exit_code": service.exit_code,
            "companions_killed": service.companions_left, "log_lines": len(lines), "log_head": lines[:20],
            "access_lines": len(every) - len(lines)}


class Run:
    """One benchmark run: its services, its results, and the cleanup of everything it started."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.phases = settings.only or PHASE_NAMES
        self.progress = progress
        self.started_at = time.time()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.services: list[procs.Service] = []
        self.strays: list[int] = []
        self.results: dict[str, Any] = {
            "benchmark": "isolated-task-runner",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_facts(),
            "settings": settings.as_dict(),
            "daemon_config": procs.daemon_config(settings.max_running, settings.max_queued),
        }

    async def attempt(self, key: str, measurement: Awaitable[dict[str, Any]]) -> None:
        """Run one phase; a failure is recorded and reported, and the next phases still run."""
        try:
            self.results[key] = await measurement
        except Exception as exc:
            self.results.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
            self.progress.note(f"FAILED: {type(exc).__name__}: {exc}")

    async def start(self, kind: str, config: dict[str, Any] | None = None) -> procs.Service:
        """The echo service, or a daemon with `config` (by default, the one every phase's daemon runs with)."""
        directory = self.workdir / f"{kind}-{len(self.services)}"
        if kind == "echo":
            service = await asyncio.to_thread(procs.start_echo, directory)
        else:
            config = config or procs.daemon_config(self.settings.max_running, self.settings.max_queued)
            service = await asyncio.to_thread(procs.start_daemon, directory, config)
        self.services.append(service)
        return service

    async def stop(self, service: procs.Service, key: str) -> None:
        await asyncio.to_thread(service.stop)
        self.results.setdefault("services", {})[key] = service_facts(service)

    def wants(self, *names: str) -> bool:
        return any(name in self.phases for name in names)

    async def measure(self) -> None:
        s, progress = self.settings, self.progress
        if self.wants(*SHARED):
            await self.shared()
        if self.wants("leanness"):
            points = s.lean_checkpoints
            progress.phase(f"leanness: a fresh daemon, {points[-1]:,} no-op tasks at {s.lean_concurrency} in "
                           f"flight, footprint after {', '.join(f'{p:,}' for p in points)}")
            await self.attempt("leanness", self.leanness())
        if self.wants("admission_scale"):
            progress.phase(f"admission at scale: a fresh daemon, no-op Perform one call at a time, with nothing "
                           f"waiting and with {s.scale_waiting:,} calls waiting under as many fairness keys for a "
                           "task at its max_running = 1")
            await self.attempt("admission_scale", self.admission_scale())
        if self.wants("sandbox"):
            progress.phase(f"sandbox: two fresh daemons, every sandbox part on and every part off; {s.sandbox_repeats} "
                           f"rounds of no-op Perform at {s.baseline_concurrency} in flight ({s.window_s:.1f} s) and "
                           f"{s.latency_calls // s.sandbox_repeats} calls one at a time, alternating")
            await self.attempt("sandbox", self.sandbox())
        if self.wants("observability"):
            progress.phase(f"observability: {s.sandbox_repeats} rounds of no-op Perform at {s.baseline_concurrency} "
                           "in flight, untraced, with a traceparent, and on a daemon without its access log")
            await self.attempt("observability", self.observability())
        if self.wants("fleet"):
            progress.phase(f"fleet: one daemon against two (half the slots each) behind one ring_hash channel; "
                           f"{s.sandbox_repeats} rounds of no-op Perform at {s.baseline_concurrency} in flight")
            await self.attempt("fleet", self.fleet())
        if self.wants("big_requests"):
            progress.phase(f"big requests: a fresh daemon (max_queued_bytes 256 MiB); its RSS with "
                           f"{big_requests.QUEUED_CALLS} calls of 4 MiB waiting behind a held slot, then a no-op's "
                           f"latency alone and beside {big_requests.BIG_CALLS} 4 MiB calls of many small values, "
                           f"{s.sandbox_repeats} rounds")
            await self.attempt("big_requests", big_requests.run_phase(
                self.workdir / f"big-{len(self.services)}", s, progress, self.services))

    async def shared(self) -> None:
        """The phases on the first daemon (and the echo service, for those that compare with it)."""
        s, progress = self.settings, self.progress
        with_echo = self.wants("latency", "throughput")
        progress.phase(f"starting {'the bare echo service and ' if with_echo else ''}the daemon (max_running "
                       f"{s.max_running}, max_queued {s.max_queued}, log WARNING)")
        echo = await self.start("echo") if with_echo else None
        daemon = await self.start("daemon")
        echo_channel = await open_channel(echo.target(s.transport)) if echo is not None else None
        daemon_channel = await open_channel(daemon.target(s.transport))
        try:
            if echo_channel is not None and self.wants("latency"):
                progress.phase(f"latency one call at a time: {s.latency_calls} echo and {s.latency_calls} Perform "
                               f"no-op calls, alternating in blocks of {s.latency_block}")
                await self.attempt("latency", phases.latency(echo_channel, daemon_channel, s))
            if echo_channel is not None and self.wants("throughput"):
                progress.phase(f"throughput at {', '.join(map(str, s.levels))} in flight: echo and Perform no-op, "
                               f"{s.repeats} x {s.window_s:.1f} s each, alternating")
                await self.attempt("throughput", phases.throughput(echo_channel, daemon_channel, s, progress))
            if echo is not None:
                await self.stop(echo, "echo")
            if self.wants("sleep10"):
                progress.phase(f"Perform sleep10 at {s.baseline_concurrency} in flight: {s.repeats} x "
                               f"{s.window_s:.1f} s")
                await self.attempt("sleep10", phases.sleep10(daemon_channel, s))
            if self.wants("work_scale"):
                progress.phase(f"work scale: Perform of tasks asleep {', '.join(map(str, phases.WORK_MS.values()))} "
                               f"ms at {', '.join(map(str, phases.WORK_LEVELS))} in flight, a window each")
                await self.attempt("work_scale", phases.work_scale(daemon_channel, s, progress))
            if self.wants("fork_floor"):
                line = f"the fork floor: a fork per no-op task, {s.repeats} x {s.window_s:.1f} s"
                if self.wants("sleep10"):
                    progress.note(line)
                else:
                    progress.phase(line)
                await self.attempt("fork_floor", phases.fork_floor(s))
            if self.wants("baselines"):
                progress.phase(f"baselines: fresh interpreter and ProcessPoolExecutor(max_tasks_per_child=1), "
                               f"{s.baseline_sequential_calls} calls one at a time, then {s.repeats} x "
                               f"{s.baseline_window_s:.1f} s at {s.baseline_concurrency} in flight, each beside a "
                               f"{s.window_s:.1f} s Perform no-op window")
                await self.attempt("baselines", phases.baselines(daemon_channel, s, progress))
            if self.wants("deadline"):
                progress.phase(f"deadline: stubborn task with timeout {s.deadline_timeout_ms} ms, "
                               f"{s.deadline_runs} runs one at a time, checking every recorded pid is gone")
                await self.attempt("deadline", phases.deadline(
                    daemon_channel, s, self.workdir / "pids", self.started_at, self.strays,
                ))
        finally:
            if echo_channel is not None:
                await echo_channel.close(None)
            await daemon_channel.close(None)
        await self.stop(daemon, "daemon")

    async def leanness(self) -> dict[str, Any]:
        lean = await self.start("daemon")
        try:
            channel = await open_channel(lean.target(self.settings.transport))
            try:
                return await phases.leanness(lean, channel, self.settings, self.progress)
            finally:
                await channel.close(None)
        finally:
            await self.stop(lean, "lean_daemon")

    async def admission_scale(self) -> dict[str, Any]:
        port = scale.free_port()
        config = scale.daemon_config(self.settings, port)
        daemon = await asyncio.to_thread(scale.start_daemon, self.workdir / f"scale-{len(self.services)}", config)
        self.services.append(daemon)
        try:
            return await scale.admission_scale(daemon, port, config, self.settings, self.progress)
        finally:
            await self.stop(daemon, "scale_daemon")

    async def sandbox(self) -> dict[str, Any]:
        daemons: dict[str, procs.Service] = {}
        try:
            for side in sandbox.SIDES:
                daemons[side] = await self.start("daemon", sandbox.daemon_config(self.settings, side))
            return await sandbox.sandbox(daemons, self.settings, self.progress)
        finally:
            for side, daemon in daemons.items():
                await self.stop(daemon, f"{side}_daemon")

    async def observability(self) -> dict[str, Any]:
        daemons: dict[str, procs.Service] = {}
        try:
            for name, config in observability.daemon_configs(self.settings).items():
                daemons[name] = await self.start("daemon", config)
            return await observability.observability(daemons, self.settings, self.progress)
        finally:
            for name, daemon in daemons.items():
                await self.stop(daemon, f"observability_{name}_daemon")

    async def fleet(self) -> dict[str, Any]:
        started: list[procs.Service] = []
        try:
            one = await self.start("daemon", fleet.daemon_config(self.settings, 1))
            started.append(one)
            two = [await self.start("daemon", fleet.daemon_config(self.settings, 2)) for _ in range(2)]
            started += two
            return await fleet.fleet(one, two, self.settings, self.progress)
        finally:
            for index, daemon in enumerate(started):
                await self.stop(daemon, f"fleet_daemon_{index}")

    def cleanup(self) -> None:
        """Stop every service (SIGTERM, then SIGKILL), then anything else we started that still runs."""
        for service in self.services:
            if service.exit_code is None:
                service.stop()
        leftovers = procs.stop_descendants()
        leftovers += [f"{pid} (task tree)" for pid in procs.kill_own(self.strays, self.started_at)]
        if leftovers:
            self.results["stopped_at_cleanup"] = leftovers
        shutil.rmtree(self.workdir, ignore_errors=True)


def progress_lines(only: tuple[str, ...]) -> int:
    """The numbered progress lines a run prints: one a phase (the fork floor's is a note beside
    sleep10's), one for starting the first daemon, one for the report."""
    chosen = only or PHASE_NAMES
    lines = sum(1 for name in chosen if name != "fork_floor" or "sleep10" not in chosen)
    return lines + (1 if any(name in SHARED for name in chosen) else 0) + 1


async def run(settings: Settings, out: Path) -> int:
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    if current is not None:
        loop.add_signal_handler(signal.SIGTERM, current.cancel)
    progress = Progress(progress_lines(settings.only))
    bench = Run(settings, progress)
    begin = time.monotonic()
    try:
        await bench.measure()
    except Exception as exc:  # reported with whatever was measured before it
        bench.results.setdefault("errors", {})["run"] = f"{type(exc).__name__}: {exc}"
        progress.note(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        bench.cleanup()
    results = bench.results
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    results["duration_s"] = time.monotonic() - begin
    json_path, chart_path = out / "latest.json", out / "latency.png"
    if settings.only:  # a partial run leaves the full run's results as they were
        stem = "only-" + "-".join(settings.only)
        json_path, chart_path = out / f"{stem}.json", out / f"{stem}.png"
    progress.phase(f"report: {json_path} and {chart_path}")
    targets = report.evaluate(results)
    report.write_json(results, targets, json_path)
    charted = report.draw_chart(results, chart_path)
    print(report.render(results, targets))
    print(f"\n{settings.mode} run took {results['duration_s']:.0f} s; raw figures in {json_path}, "
          + (f"chart in {chart_path}" if charted else "no chart (no plotted phase ran)"))
    return 1 if results.get("errors") else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(Settings.for_mode(args.quick, args.transport, args.only), args.out))


if __name__ == "__main__":
    sys.exit(main())

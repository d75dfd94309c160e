"""CPU per no-op task of each process, every sandbox part on: `python -m bench.cpu_per_task [--rounds N]`.

What one install costs, printed as JSON lines (one a round): the daemon's, the fork server's own and its task
processes' CPU milliseconds per task, over 600 no-op calls at 16 in flight after 100 to warm up, and the calls a
second. To hold two commits against each other in the same sitting, run it from each checkout's virtual
environment in turn, a round at a time, and compare the medians:

    for i in 1 2 3 4 5; do for tree in ../old ../new; do (cd $tree && .venv/bin/python -m bench.cpu_per_task \\
        --rounds 1); done; done
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc.aio
import psutil

from bench import procs
from bench.drivers import open_channel, perform_request

SANDBOX = {"filesystem": "private", "network": "none", "processes": "private", "syscalls": "default"}
CALLS, WARM_UP, IN_FLIGHT = 600, 100, 16


def cpu_ms(process: psutil.Process, children: bool = False) -> float:
    times = process.cpu_times()
    return 1e3 * ((times.children_user + times.children_system) if children else (times.user + times.system))


async def calls(channel: grpc.aio.Channel, count: int) -> float:
    """`count` no-op Performs, IN_FLIGHT at a time; the seconds they took."""
    perform = channel.unary_unary("/task_runner.v1.TaskRunner/Perform")
    request = perform_request("noop", 10_000)
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await perform(request)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.monotonic() - started


async def one_round(directory: Path) -> dict[str, float]:
    config = {**procs.daemon_config(32, 1024), "cgroup": "off", "sandbox": SANDBOX}
    daemon = await asyncio.to_thread(procs.start_daemon, directory, config)
    try:
        forkserver = procs.forkserver_of(daemon.pid)
        assert forkserver is not None, "the daemon has no fork server"
        channel = await open_channel(daemon.target("unix"))
        try:
            await calls(channel, WARM_UP)
            main = psutil.Process(daemon.pid)
            before = (cpu_ms(main), cpu_ms(forkserver), cpu_ms(forkserver, children=True))
            seconds = await calls(channel, CALLS)
            await asyncio.sleep(0.5)  # the last task processes reaped
            after = (cpu_ms(main), cpu_ms(forkserver), cpu_ms(forkserver, children=True))
        finally:
            await channel.close(None)
    finally:
        daemon.stop()
    per_task = {name: (b - a) / CALLS for name, a, b in zip(("daemon", "forkserver", "task_process"), before, after,
                                                             strict=True)}
    return {**per_task, "per_s": CALLS / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        directory = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
        try:
            print(json.dumps({key: round(value, 3) for key, value in asyncio.run(one_round(directory)).items()}),
                  flush=True)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

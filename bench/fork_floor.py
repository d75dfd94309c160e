"""The fork floor: what a task costs when it is nothing but a fork of the fork server.

`python -m bench.fork_floor SECONDS IN_FLIGHT TARGETS_JSON` imports what the fork server imports
(its own module and the tasks' modules, `TARGETS_JSON` being {name: "module:function"}), freezes
the collector as it does, then keeps IN_FLIGHT children going for SECONDS: each child writes a
serialized no-op answer to a pipe and exits; the parent reads the answer, parses it, reaps the
child and forks the next. It prints {"tasks": n, "seconds": s, "per_s": n / s} as JSON.

It runs as a process of its own, single-threaded: the benchmark's client has gRPC threads and
must never fork.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import sys
import time

import task_runner.server.forkserver.server  # noqa: F401 - the fork server's own imports
from task_runner.server.registry import load
from task_runner.v1.task_runner_pb2 import PerformResponse


def _child(answer_fd: int) -> None:
    os.write(answer_fd, PerformResponse(outcome=True).SerializeToString())
    os._exit(0)


def measure(seconds: float, in_flight: int) -> dict[str, float]:
    selector = selectors.DefaultSelector()

    def spawn() -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child(write_end)
        os.close(write_end)
        selector.register(read_end, selectors.EVENT_READ, pid)

    def finish_one() -> None:
        for key, _ in selector.select():
            PerformResponse.FromString(os.read(key.fd, 4096))
            selector.unregister(key.fd)
            os.close(key.fd)
            os.waitpid(key.data, 0)
            return

    for _ in range(in_flight):
        spawn()
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        finish_one()
        done += 1
        spawn()
    elapsed = time.monotonic() - started
    while selector.get_map():
        finish_one()
    return {"tasks": done, "seconds": elapsed, "per_s": done / elapsed}


def main() -> None:
    seconds, in_flight, targets = float(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    for target in targets.values():
        load(target)
    gc.collect()
    gc.freeze()
    measure(min(0.3, seconds), in_flight)  # warm-up
    print(json.dumps(measure(seconds, in_flight)))


if __name__ == "__main__":
    main()

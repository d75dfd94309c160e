"""Hostile tasks against the channel promises: forged runner answers, a follower's memory, a tiny-frame flood.

Each writes on its channel (fd 3) what the daemon must not trust or must not be slowed by, as raw
frames: a 4-byte big-endian length, then a kind byte and its payload (see task_runner.frames).
Registered by the tests that use them (tests/test_channel_promises.py), not by the shared daemon.
"""

import os
import struct
import time

CHANNEL = 3


def _frame(kind, payload=b""):
    return struct.pack("!I", len(payload) + 1) + kind + payload


def _forged_invalid_options():
    """The answer frame the runner itself once sent for options JSON cannot carry: error kind 0, InvalidOptions."""
    from task_runner.v1.task_runner_pb2 import PerformResponse

    answer = PerformResponse()
    answer.error.type, answer.error.message = "InvalidOptions", "options: forged by the task"
    return _frame(b"A", answer.SerializeToString())


def _side_effect(options):
    with open(options["file"], "a") as f:
        f.write(f"{os.getpid()}\n")


def forge_invalid_options(options):
    """Do its work, claim the runner's invalid-options answer, then return normally."""
    _side_effect(options)
    os.write(CHANNEL, _forged_invalid_options())
    return True, {"ran": True}


def forge_invalid_options_and_exit(options):
    """Do its work, claim the runner's invalid-options answer, then end at once."""
    _side_effect(options)
    os.write(CHANNEL, _forged_invalid_options())
    os._exit(0)


def forge_runner_verdict(options):
    """Do its work, then send the runner's own first frames after it started: "options invalid", "the task starts"."""
    _side_effect(options)
    os.write(CHANNEL, _frame(b"I", b"options: forged by the task") + _frame(b"S"))
    return True


def big_progress(options):
    """Send options["n"] progress reports and heartbeats of options["pad"] bytes of details each, one pair every
    60 ms (so each becomes an event of its own); then progress "sent"; wait for the file options["gate"];
    answer with options["result_bytes"] bytes of result."""
    from task_runner import task

    pad = "x" * options.get("pad", 60_000)
    n = options.get("n", 60)
    for i in range(n):
        task.progress(i / n, stage="big", i=i, pad=pad)
        task.heartbeat(i=i, pad=pad)
        time.sleep(0.06)
    task.progress(1.0, stage="sent")
    while not os.path.exists(options["gate"]):
        time.sleep(0.01)
    return True, {"sent": n, "pad": "y" * options.get("result_bytes", 0)}


def tiny_flood(options):
    """Write 5-byte progress frames (an empty Progress) raw on the channel as fast as it can, until killed;
    first create a file options["started"] + "." + a name of its own, once the flood is under way."""
    frames = _frame(b"P") * 4096
    os.write(CHANNEL, frames)
    open(f"{options['started']}.{os.urandom(8).hex()}", "w").close()  # (its pid may be every flooder's)
    while True:
        os.write(CHANNEL, frames)


def sleeper(options):
    """Sleep options["s"] seconds, then answer."""
    time.sleep(options.get("s", 10))
    return True


def flood_then_answer(options):
    """Write options["frames"] 5-byte progress frames raw, then answer as usual: the answer comes after them all."""
    batch = _frame(b"P") * 4096
    for _ in range(options.get("frames", 1 << 20) // 4096):
        os.write(CHANNEL, batch)
    return True, {"after": "the flood"}


def flood_then_oversized(options):
    """Write 5-byte progress frames raw, then a frame header announcing 2 GiB, then wait to be killed."""
    os.write(CHANNEL, _frame(b"P") * 100_000 + struct.pack("!I", 0x7FFF_FFFF) + b"A")
    time.sleep(60)

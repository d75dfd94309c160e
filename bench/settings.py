"""What a run measures, and how much of it (full or --quick); and the progress lines it prints."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    mode: str
    transport: str
    latency_calls: int  # one call at a time, per system
    latency_block: int  # echo and Perform alternate in blocks of this many calls
    repeats: int  # of each throughput window
    window_s: float  # length of one throughput window
    baseline_window_s: float  # the same, for the (slower) process-per-task baselines
    window_min_calls: int  # a window is stretched until it holds this many answers,
    window_min_per_flight: int  # and this many per call in flight
    warmup_calls: int  # before every measurement: this many calls, or fewer once warmup_s has passed
    warmup_s: float
    levels: tuple[int, ...]  # calls in flight
    baseline_sequential_calls: int
    baseline_concurrency: int
    deadline_runs: int
    deadline_warmup_runs: int
    deadline_timeout_ms: int
    lean_checkpoints: tuple[int, ...]  # cumulative no-op tasks after which the daemon is measured
    lean_concurrency: int
    lean_max_s: float  # the leanness phase stops here, at whatever count it reached
    scale_waiting: int  # admission at scale: the calls waiting, each under a fairness key of its own
    scale_latency_calls: int  # one at a time, with nothing waiting and with all of them waiting
    sandbox_repeats: int  # rounds of the sandbox phase, sandboxed and unsandboxed daemon alternating in each
    max_running: int
    max_queued: int
    only: tuple[str, ...] = ()  # the phases to run (--only); empty: all

    @classmethod
    def for_mode(cls, quick: bool, transport: str, only: tuple[str, ...] = ()) -> Settings:
        # The footprint is taken after the first checkpoint and the last (and at a few between).
        lean = (500, 1_750, 3_000) if quick else tuple(range(5_000, 50_001, 5_000))
        return cls(
            mode="quick" if quick else "full",
            transport=transport,
            latency_calls=200 if quick else 1000,
            latency_block=100,
            repeats=1 if quick else 3,
            window_s=0.8 if quick else 1.5,
            baseline_window_s=1.2 if quick else 3.0,
            window_min_calls=20 if quick else 50,
            window_min_per_flight=0 if quick else 2,
            warmup_calls=50 if quick else 200,
            warmup_s=0.3 if quick else 0.5,
            levels=(1, 8, 32, 128),
            baseline_sequential_calls=5 if quick else 30,
            baseline_concurrency=32,
            deadline_runs=10 if quick else 40,
            deadline_warmup_runs=1,
            deadline_timeout_ms=100,
            lean_checkpoints=lean,
            lean_concurrency=32,
            lean_max_s=120.0 if quick else 420.0,
            scale_waiting=10_000 if quick else 100_000,
            scale_latency_calls=100 if quick else 300,
            sandbox_repeats=2 if quick else 5,
            max_running=32,
            max_queued=1024,
            only=only,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """One line per phase on stderr, with the time since the start."""

    def __init__(self, phases: int) -> None:
        self._begin = time.monotonic()
        self._phases = phases
        self._n = 0

    def phase(self, text: str) -> None:
        self._n += 1
        self._print(f"{self._n}/{self._phases} {text}")

    def note(self, text: str) -> None:
        self._print(f"    {text}")

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self._begin:6.1f} s] {text}", file=sys.stderr, flush=True)

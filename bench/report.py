"""The results as a table, a verdict on each target, a JSON file and a chart of latency distributions."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SYSTEMS = {
    "echo": "bare echo (transport floor)",
    "perform": "Perform no-op",
    "fresh_interpreter": "fresh interpreter per task",
    "process_pool": "ProcessPoolExecutor(max_tasks_per_child=1)",
}
SANDBOX_SIDES = ("sandboxed", "unsandboxed")  # bench.sandbox.SIDES: every part on, every part off


@dataclass(frozen=True)
class Target:
    claim: str
    measured: str
    met: bool | None  # None: not measured


def _get(results: dict[str, Any], *path: str) -> Any:
    """results[path[0]][path[1]]...; None if any step is missing."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _num(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}x"


def _checkpoint(results: dict[str, Any], tasks: int) -> dict[str, Any] | None:
    for checkpoint in _get(results, "leanness", "checkpoints") or []:
        if checkpoint["tasks"] == tasks:
            return dict(checkpoint)
    return None


def perform_failures(results: dict[str, Any]) -> dict[str, int]:
    """Non-OK answers to Perform, per phase (the deadline phase: answers other than TIMEOUT)."""
    counts: dict[str, int] = {}

    def add(phase: str, *failure_maps: dict[str, int] | None) -> None:
        counts[phase] = counts.get(phase, 0) + sum(sum((m or {}).values()) for m in failure_maps)

    if "latency" in results:
        add("latency", _get(results, "latency", "perform", "failures"),
            _get(results, "latency", "perform", "warmup_failures"))
    for level in (_get(results, "throughput", "perform") or {}).values():
        add("throughput", level.get("failures"), level.get("warmup_failures"))
    if "sleep10" in results:
        add("sleep10", _get(results, "sleep10", "failures"), _get(results, "sleep10", "warmup_failures"))
    if "deadline" in results:
        add("deadline", _get(results, "deadline", "failures"))
    for key in ("fresh_interpreter", "process_pool"):
        if _get(results, "baselines", key, "perform_alongside") is not None:
            add("baselines", _get(results, "baselines", key, "perform_alongside", "failures"),
                _get(results, "baselines", key, "perform_alongside", "warmup_failures"))
    if "leanness" in results:
        add("leanness", _get(results, "leanness", "failures"))
    if "admission_scale" in results:
        scale = results["admission_scale"]
        add("admission_scale", *(_get(scale, part, kind) for part in ("empty", "loaded", "empty_after")
                                 for kind in ("failures", "warmup_failures")))
        counts["admission_scale"] += _get(scale, "fill", "ended_early") or 0  # waiting calls answered early
    if "sandbox" in results:
        add("sandbox", *(_get(results, "sandbox", side, part, kind) for side in SANDBOX_SIDES
                         for part in ("throughput", "one_at_a_time", "one_at_a_time_paused")
                         for kind in ("failures", "warmup_failures")))
    return counts


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Each target of the brief, with the figure measured in this run."""
    targets = []
    echo_p50, perform_p50 = _get(results, "latency", "echo", "p50_ms"), _get(results, "latency", "perform", "p50_ms")
    ratio = _ratio(perform_p50, echo_p50)
    targets.append(Target(
        "no-op Perform p50 latency <= 2.0 x bare echo p50",
        f"{_x(ratio)} ({_num(perform_p50, 2)} ms vs {_num(echo_p50, 2)} ms)",
        None if ratio is None else ratio <= 2.0,
    ))
    perform32 = _get(results, "throughput", "perform", "32", "median")
    echo32 = _get(results, "throughput", "echo", "32", "median")
    targets.append(Target(
        "no-op throughput at 32 in flight >= 1,000 tasks/s",
        f"{_num(perform32, 0)} tasks/s", None if perform32 is None else perform32 >= 1000,
    ))
    ratio = _ratio(perform32, echo32)
    targets.append(Target(
        "no-op throughput at 32 in flight >= 0.5 x bare echo at 32",
        f"{_x(ratio)} ({_num(perform32, 0)}/s vs {_num(echo32, 0)}/s)", None if ratio is None else ratio >= 0.5,
    ))
    floor = _get(results, "fork_floor", "median")
    for label, figure in (("no-op throughput at 32 in flight", perform32),
                          ("sleep10 throughput at 32 in flight", _get(results, "sleep10", "median"))):
        ratio = _ratio(figure, floor)
        targets.append(Target(
            f"{label} >= 0.5 x the fork floor", f"{_x(ratio)} ({_num(figure, 0)}/s vs {_num(floor, 0)}/s)",
            None if ratio is None else ratio >= 0.5,
        ))
    for key, factor in (("fresh_interpreter", 15), ("process_pool", 30)):
        base = _get(results, "baselines", key, "median")
        beside = _get(results, "baselines", key, "perform_alongside", "median")
        ratio = _get(results, "baselines", key, "ratio")
        targets.append(Target(
            f"throughput at 32 >= {factor} x {SYSTEMS[key]}",
            f"{_x(ratio, 1)} (median of paired windows; medians Perform {_num(beside, 0)}/s, it {_num(base, 1)}/s)",
            None if ratio is None else ratio >= factor,
        ))
    p99 = _get(results, "deadline", "overshoot_ms", "p99")
    targets.append(Target(
        "deadline overshoot p99 <= 30 ms (stubborn task, timeout 100 ms)",
        f"{_num(p99, 1)} ms", None if p99 is None else p99 <= 30,
    ))
    left = _get(results, "deadline", "left_behind")
    targets.append(Target(
        "zero processes left behind by timed-out task trees", "-" if left is None else f"{left}",
        None if left is None else left == 0,
    ))
    points = list(_get(results, "settings", "lean_checkpoints") or [])
    first, last = (_checkpoint(results, points[0]), _checkpoint(results, points[-1])) if points else (None, None)
    if first and last:
        growth = last["rss_mib"] - first["rss_mib"]
        d_threads, d_fds = last["threads"] - first["threads"], last["fds"] - first["fds"]
        span = f"{points[0]:,} -> {points[-1]:,} tasks"
        targets.append(Target(f"daemon RSS growth <= 10 MiB ({span})", f"{growth:+.1f} MiB", growth <= 10))
        targets.append(Target(
            f"daemon threads and descriptors flat, within +-2 ({span})",
            f"threads {d_threads:+.0f}, fds {d_fds:+.0f}", abs(d_threads) <= 2 and abs(d_fds) <= 2,
        ))
    else:
        targets.append(Target("daemon RSS growth <= 10 MiB; threads and descriptors flat", "-", None))
    ratio = _get(results, "admission_scale", "ratio")
    waiting = _get(results, "admission_scale", "fill", "waiting") or _get(results, "settings", "scale_waiting") or 0
    loaded = _get(results, "admission_scale", "loaded", "p50_ms")
    empty = _get(results, "admission_scale", "empty_pooled_p50_ms")
    targets.append(Target(
        f"no-op Perform p50 with {waiting:,} calls waiting under as many fairness keys (for a task at its "
        "max_running) <= 2.0 x its p50 with none waiting (before and after, pooled)",
        f"{_x(ratio)} ({_num(loaded, 2)} ms vs {_num(empty, 2)} ms)", None if ratio is None else ratio <= 2.0,
    ))
    on, off = (_get(results, "sandbox", side, "throughput", "median") for side in SANDBOX_SIDES)
    ratio = _get(results, "sandbox", "throughput_ratio")
    targets.append(Target(
        "no-op throughput at 32 in flight with every sandbox part on >= 0.6 x with every part off",
        f"{_x(ratio)} ({_num(on, 0)}/s vs {_num(off, 0)}/s)", None if ratio is None else ratio >= 0.6,
    ))
    for part, key, how in (("one_at_a_time", "p50_ratio", "back to back"),
                           ("one_at_a_time_paused", "p50_paused_ratio", "20 ms apart")):
        on, off = (_get(results, "sandbox", side, part, "p50_ms") for side in SANDBOX_SIDES)
        ratio = _get(results, "sandbox", key)
        targets.append(Target(
            f"no-op Perform p50 one at a time ({how}) with every sandbox part on <= 1.25 x with every part off",
            f"{_x(ratio)} ({_num(on, 2)} ms vs {_num(off, 2)} ms)", None if ratio is None else ratio <= 1.25,
        ))
    failures = perform_failures(results)
    total = sum(failures.values())
    detail = ", ".join(f"{phase} {count}" for phase, count in failures.items())
    targets.append(Target(
        "no rejected or failed Perform calls", f"{total} ({detail})", total == 0 if failures else None,
    ))
    return targets


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Plain text columns: the first left-aligned, the others right-aligned."""
    rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(results: dict[str, Any], targets: list[Target]) -> str:
    s = results["settings"]
    m = results["machine"]
    only = s.get("only") or ()

    def shown(*phases: str) -> bool:
        """Whether a section's phases ran (every section in a full run)."""
        return not only or any(phase in only for phase in phases)

    out = [
        f"isolated-task-runner benchmark ({s['mode']}), {results['date']}, git {m.get('git_commit', '?')}"
        f"{' (uncommitted changes)' if m.get('git_dirty') else ''}",
        f"machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), Linux {m['kernel']}, Python {m['python']}, "
        f"grpcio {m.get('grpcio', '?')}; load average {_num(m.get('loadavg_start'), 2)} at the start, "
        f"{_num(m.get('loadavg_end'), 2)} at the end",
        f"daemon: max_running {s['max_running']}, max_queued {s['max_queued']}, log WARNING; "
        f"client: one grpc.aio channel over {s['transport']}, N coroutines each calling in a loop",
        f"throughput: median of {s['repeats']} windows of {s['window_s']:.1f} s ({s['baseline_window_s']:.1f} s for "
        f"the baselines), each after a warm-up of {s['warmup_calls']} calls (or {s['warmup_s']:.1f} s); "
        "every ratio is to a figure of this same run",
    ]
    if only:
        out.append(f"only the phases {', '.join(only)} (--only)")
    for key, error in (results.get("errors") or {}).items():
        out.append(f"ERROR in phase {key}: {error}")

    if shown("latency", "baselines"):
        out += ["", *_table(
            ["Latency, one call at a time", "calls", "p50 ms", "p99 ms", "max ms", "p50 / echo"],
            _latency_rows(results),
        )]
    if shown("throughput", "fork_floor"):
        out += _throughput_section(results)
    if shown("baselines"):
        out += _baselines_section(results)
    if shown("sleep10"):
        out += _sleep10_section(results)
    if shown("work_scale"):
        out += _work_scale_section(results)
    if shown("throughput"):
        out += _where_time_goes_section(results)
    if shown("deadline"):
        out += _deadline_section(results)
    if shown("leanness"):
        out += _leanness_section(results)
    if shown("admission_scale"):
        out += _admission_scale_section(results)
    if shown("sandbox"):
        out += _sandbox_section(results)
    out += _notes(results)

    out += ["", "Targets"]
    for target in targets:
        if only and target.met is None:
            continue  # a phase not run
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target.met]
        out.append(f"  {verdict:<12}  {target.claim}: {target.measured}")
    return "\n".join(out)


def _throughput_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    out: list[str] = []
    levels = [str(level) for level in s["levels"]]
    rows = []
    for key in ("echo", "perform"):
        rows.append([SYSTEMS[key], *(_num(_get(results, "throughput", key, lv, "median"), 0) for lv in levels)])
    rows.append(["Perform / echo", *(_x(_ratio(
        _get(results, "throughput", "perform", lv, "median"), _get(results, "throughput", "echo", lv, "median"),
    )) for lv in levels)])
    rows.append(["Perform p50 latency, ms", *(
        _num(_get(results, "throughput", "perform", lv, "latency", "p50_ms"), 2) for lv in levels)])
    out += ["", *_table(["Throughput, calls/s, at N in flight", *levels], rows)]
    floor = results.get("fork_floor") or {}
    if floor:
        out.append(f"fork floor (a fork per no-op task with the fork server's preloads, {floor['in_flight']} in "
                   f"flight, answer read from a pipe, child reaped): {_num(floor['median'], 0)}/s; Perform at 32 is "
                   f"{_x(_ratio(_get(results, 'throughput', 'perform', '32', 'median'), floor['median']))} of it")
    return out


def _baselines_section(results: dict[str, Any]) -> list[str]:
    n = results["settings"]["baseline_concurrency"]
    rows = []
    for key in ("fresh_interpreter", "process_pool"):
        rows.append([SYSTEMS[key], _num(_get(results, "baselines", key, "median"), 1),
                     _num(_get(results, "baselines", key, "perform_alongside", "median"), 0),
                     _x(_get(results, "baselines", key, "ratio"), 1),
                     " ".join(_x(r, 1) for r in _get(results, "baselines", key, "paired_ratios") or [])])
    return ["", *_table([f"One process per task, same no-op, {n} in flight", "tasks/s", "Perform beside it",
                         "Perform / it", "each pair"], rows)]


def _sleep10_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    n = s["baseline_concurrency"]
    sleep = results.get("sleep10") or {}
    return ["", *_table(
        [f"Perform sleep10 (10 ms), {n} in flight, max_running {s['max_running']}", "tasks/s", "ideal/s", "of ideal",
         "run_ms p50", "queue_ms p50"],
        [["", _num(sleep.get("median"), 0), _num(sleep.get("ideal"), 0),
          _num(None if sleep.get("ratio_to_ideal") is None else 100 * sleep["ratio_to_ideal"], 0, "%"),
          _num(_get(sleep, "timings", "run_ms"), 2), _num(_get(sleep, "timings", "queue_ms"), 2)]],
    )]


def _where_time_goes_section(results: dict[str, Any]) -> list[str]:
    n = results["settings"]["baseline_concurrency"]
    rows = []
    for level in ("1", str(n)):
        t = _get(results, "throughput", "timings", level) or {}
        rows.append([f"{level} in flight", *(_num(t.get(k), 3) for k in
                     ("client_ms", "queue_ms", "start_ms", "run_ms", "collect_ms", "outside_ms"))])
    return ["", *_table(
        ["Where a no-op Perform's time goes, median ms", "client", "queue", "start", "run", "collect", "outside"],
        rows,
    ), "  (outside = client latency minus the daemon's four timings: gRPC both ways, parsing, the client loop)"]


def _deadline_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    d = results.get("deadline") or {}
    o = d.get("overshoot_ms") or {}
    return ["", *_table(
        [f"Deadline: stubborn task, timeout {s['deadline_timeout_ms']} ms, {s['deadline_runs']} runs one at a time",
         "median", "p99", "max"],
        [["answer time past the timeout, ms", _num(o.get("median"), 1), _num(o.get("p99"), 1), _num(o.get("max"), 1)],
         ["whole tree gone, ms after the answer", _num(_get(d, "tree_gone_after_answer_ms", "median"), 1), "",
          _num(_get(d, "tree_gone_after_answer_ms", "max"), 1)]],
    ), f"  processes left behind: {d.get('left_behind', '-')} "
       f"(pids recorded per run: {_get(d, 'pids_per_run', 'min') or '-'} to {_get(d, 'pids_per_run', 'max') or '-'})"]


def _leanness_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    out: list[str] = []
    rows = []
    for c in _get(results, "leanness", "checkpoints") or []:
        rows.append([f"{c['tasks']:,}", _num(c.get("rss_mib"), 1), _num(c.get("threads"), 0), _num(c.get("fds"), 0),
                     _num(c.get("forkserver_rss_mib"), 1), _num(c.get("forkserver_fds"), 0),
                     _num(c.get("throughput"), 0)])
    out += ["", *_table(
        [f"Leanness: daemon after N no-op tasks ({s['lean_concurrency']} in flight)", "RSS MiB", "threads", "fds",
         "forkserver RSS MiB", "forkserver fds", "tasks/s"],
        rows,
    )]
    cpu = _get(results, "leanness", "cpu_ms_per_task") or {}
    if cpu.get("server_total") is not None:
        spent = cpu["server_total"] + (cpu.get("client") or 0.0)
        out.append(
            f"  CPU per no-op task, ms: daemon {_num(cpu.get('daemon'), 2)}, "
            f"fork server {_num(cpu.get('forkserver'), 2)}, "
            f"task process {_num(cpu.get('task_process'), 2)}, benchmark client {_num(cpu.get('client'), 2)}: "
            f"{spent:.2f} ms in all, so at most {_num(1e3 * results['machine']['nproc'] / spent, 0)} tasks/s "
            f"on {results['machine']['nproc']} CPUs if nothing else ran"
        )
    return out


def _admission_scale_section(results: dict[str, Any]) -> list[str]:
    a = results.get("admission_scale") or {}
    fill = a.get("fill") or {}
    asked = a.get("waiting_target") or results["settings"].get("scale_waiting") or 0
    waiting = fill.get("waiting", asked)
    empty_p50 = a.get("empty_pooled_p50_ms")
    rows = []
    for label, part in (("nothing waiting", "empty"), (f"{waiting:,} waiting", "loaded"),
                        ("nothing waiting again", "empty_after")):
        figures = a.get(part) or {}
        rows.append([label, str(figures.get("n", "-")), _num(figures.get("p50_ms"), 2), _num(figures.get("p99_ms"), 2),
                     _num(figures.get("max_ms"), 2), _x(_ratio(figures.get("p50_ms"), empty_p50))])
    rows.append(["nothing waiting, before and after", "", _num(empty_p50, 2), "", "", _x(1.0 if empty_p50 else None)])
    out = ["", *_table(["Admission at scale: no-op Perform, one at a time", "calls", "p50 ms", "p99 ms", "max ms",
                        "p50 / none"], rows),
           "  (the waiting calls: real gRPC calls on one channel, each under a fairness key of its own, for a task "
           "held at its max_running = 1; the measured calls on a connection of their own)"]
    if fill:
        rss, client = fill.get("daemon_rss_mib") or [None, None], fill.get("client_rss_mib") or [None, None]
        short = f" (of {asked:,} asked)" if waiting < asked else ""
        out.append(
            f"  filling: {waiting:,} calls waiting{short} after {_num(fill.get('seconds'), 1)} s "
            f"({_num(fill.get('per_s'), 0)}/s; daemon CPU {_num(fill.get('daemon_cpu_s'), 1)} s); daemon RSS "
            f"{_num(rss[0], 0)} -> {_num(rss[1], 0)} MiB ({_num(fill.get('daemon_kib_per_call'), 1)} KiB a waiting "
            f"call), this client's {_num(client[0], 0)} -> {_num(client[1], 0)} MiB; "
            f"{fill.get('ended_early', 0)} answered early")
    leave = a.get("leave") or {}
    if leave:
        out.append(f"  leaving: every waiting caller cancelled; the queue empty after "
                   f"{_num(leave.get('seconds'), 1)} s ({leave.get('left_waiting', '-')} left), daemon RSS then "
                   f"{_num(leave.get('daemon_rss_mib'), 0)} MiB")
    return out


def _work_scale_section(results: dict[str, Any]) -> list[str]:
    w: dict[str, Any] = results.get("work_scale") or {}
    first: dict[str, Any] = next(iter(w.values()), {})
    levels: dict[str, Any] = first.get("levels", {})
    rows = []
    for task, row in w.items():
        at = row["levels"]
        rows.append([f"{task} ({row['work_ms']} ms)", *(_num(at[level]["tasks_per_s"], 0) for level in levels),
                     _num(at[next(iter(levels))]["p50_ms"], 2), _num(at[next(iter(levels))]["beyond_work_ms"], 2),
                     *(_x(at[level]["share_of_ideal"]) for level in levels)])
    return ["", *_table(["Work scale: Perform", *(f"tasks/s at {level}" for level in levels), "p50 ms at 1",
                         "beyond work", *(f"of ideal at {level}" for level in levels)], rows)]


def _sandbox_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    b = results.get("sandbox") or {}
    n = b.get("concurrency", s["baseline_concurrency"])
    columns = [(("throughput", "median"), 0), (("one_at_a_time", "p50_ms"), 2), (("one_at_a_time", "p90_ms"), 2),
               (("one_at_a_time_paused", "p50_ms"), 2),
               *((("cpu_ms_per_task", key), 2) for key in ("daemon", "forkserver", "task_process", "server_total"))]
    rows = [[side, *(_num(_get(b, side, *path), digits) for path, digits in columns)] for side in SANDBOX_SIDES]
    rows.append(["sandboxed / unsandboxed", *(_x(_ratio(*(_get(b, side, *path) for side in SANDBOX_SIDES)))
                                              for path, _ in columns)])
    out = ["", *_table(
        [f"Sandbox: no-op Perform, medians of {b.get('rounds', s['sandbox_repeats'])} rounds", f"tasks/s at {n}",
         "p50 ms", "p90 ms", "p50 apart", "CPU ms/task: daemon", "fork server", "task process", "server"],
        rows,
    )]
    if b.get("daemon_config"):
        tables = "; ".join(f"{side}: " + ", ".join(f"{part} {choice}" for part, choice in
                                                   b["daemon_config"][side]["sandbox"].items())
                           for side in SANDBOX_SIDES)
        out.append(f"  ({tables}; two daemons differing only in [sandbox], alternating; p50 and p90 one call at a "
                   f"time, {b['calls_one_at_a_time_per_round']} calls a round back to back; p50 apart: half as many, "
                   f"{_get(b, 'sandboxed', 'one_at_a_time_paused', 'pause_ms') or 20:.0f} ms apart)")
    return out


def _notes(results: dict[str, Any]) -> list[str]:
    out = ["", "Notes"]
    for key, service in (results.get("services") or {}).items():
        line = f"  {key}: exit code {service.get('exit_code')}, {service.get('log_lines', 0)} log lines"
        if key != "echo":
            cgroups = service.get("task_cgroups")
            line += f" at WARNING or above (and {service.get('access_lines', 0)} of the access log)"
            line += f"; tasks in {'cgroups under ' + cgroups if cgroups else 'process groups'}"
            line += f"; fork server killed at stop: {service.get('companions_killed', 0)}"
        out.append(line)
        out += [f"      | {text[:150]}" for text in service.get("log_head", [])[:5]]
    for key in ("fresh_interpreter", "process_pool"):
        b = _get(results, "baselines", key)
        if b is not None:
            failed = sum(b.get("failures", {}).values()) + sum(b.get("warmup_failures", {}).values())
            failed += sum(_get(b, "sequential", "failures").values())
            out.append(f"  {SYSTEMS[key]}: {failed} failed tasks {b.get('failures') or ''}")
    stopped = results.get("stopped_at_cleanup") or []
    out.append(f"  processes still running at the end, stopped by the cleanup: {len(stopped)}")
    out += [f"      | {text}" for text in stopped[:5]]
    return out


def _latency_rows(results: dict[str, Any]) -> list[list[str]]:
    echo_p50 = _get(results, "latency", "echo", "p50_ms")
    rows = []
    for key, path in (("echo", ("latency", "echo")), ("perform", ("latency", "perform")),
                      ("fresh_interpreter", ("baselines", "fresh_interpreter", "sequential")),
                      ("process_pool", ("baselines", "process_pool", "sequential"))):
        figures = _get(results, *path) or {}
        rows.append([SYSTEMS[key], str(figures.get("n", "-")), _num(figures.get("p50_ms"), 2),
                     _num(figures.get("p99_ms"), 2), _num(figures.get("max_ms"), 2),
                     _x(_ratio(figures.get("p50_ms"), echo_p50))])
    return rows


def write_json(results: dict[str, Any], targets: list[Target], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = _rounded({**results, "targets": [asdict(t) for t in targets]})
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=1, allow_nan=False, default=str) + "\n")
    temporary.replace(path)


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (microseconds, for milliseconds), all the way down."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def draw_chart(results: dict[str, Any], path: Path) -> bool:
    """Empirical CDFs of per-call latency: one call at a time, and at the baselines' concurrency.

    Returns False, drawing nothing, when no phase that is plotted ran (an --only run of other phases).
    """
    n = results["settings"]["baseline_concurrency"]
    panels = [
        ("one call at a time", {
            "echo": _get(results, "latency", "echo", "samples_ms"),
            "perform": _get(results, "latency", "perform", "samples_ms"),
            "fresh_interpreter": _get(results, "baselines", "fresh_interpreter", "sequential", "samples_ms"),
            "process_pool": _get(results, "baselines", "process_pool", "sequential", "samples_ms"),
        }),
        (f"{n} calls in flight", {
            "echo": _get(results, "throughput", "echo", str(n), "samples_ms"),
            "perform": _get(results, "throughput", "perform", str(n), "samples_ms"),
            "fresh_interpreter": _get(results, "baselines", "fresh_interpreter", "samples_ms"),
            "process_pool": _get(results, "baselines", "process_pool", "samples_ms"),
        }),
    ]
    if not any(samples for _, series in panels for samples in series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    for axis, (title, series) in zip(axes, panels, strict=True):
        for key, samples in series.items():
            if not samples:
                continue
            ordered = sorted(samples)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axis.step(ordered, fractions, where="post", label=f"{SYSTEMS[key]} ({len(ordered):,})")
        axis.set_xscale("log")
        axis.set_title(f"Per-call latency, {title}")
        axis.set_xlabel("latency seen by the client, ms (log scale)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8,
                    title="(calls measured)", title_fontsize=8)
    axes[0].set_ylabel("fraction of calls at or below")
    m = results["machine"]
    figure.suptitle(f"isolated-task-runner, {results['settings']['mode']} run {results['date']} "
                    f"({m['nproc']} CPUs, Python {m['python']}, {results['settings']['transport']})", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True

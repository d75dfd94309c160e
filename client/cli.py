"""`task-runner perform`, `watch`, `cancel` and `tasks`: the client's commands (the daemon's, `serve` and
`check-config`, are in task_runner.server.cli, which builds the whole `task-runner` command).

Exit codes of `perform`: 0 outcome true, 1 outcome false, 2 an error (task or call).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from task_runner.client.errors import RpcError, TaskFailed, TaskRunnerError
from task_runner.client.follow import follow
from task_runner.client.results import RequestFields, TaskResult
from task_runner.client.sync import Client

PROG = "task-runner"
DESCRIPTION = "Run Python tasks in isolated processes over gRPC."


def main(argv: Sequence[str] | None = None) -> int:
    """The client's commands alone: `python -m task_runner.client.cli perform|tasks ...`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.run(args))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `perform` and `tasks` to a `task-runner` parser."""
    perform = commands.add_parser("perform", help="run a task on a daemon and print the answer as JSON")
    perform.add_argument("task")
    perform.add_argument("--timeout", type=int, metavar="MS", help="the task's timeout in ms (default: the task's)")
    perform.add_argument("--options", default="{}", metavar="JSON", help="the task's options, a JSON object")
    perform.add_argument("--target", metavar="ADDR",
                         help="the daemon (default: $TASK_RUNNER_TARGET or 127.0.0.1:50051)")
    perform.add_argument("--request-id", metavar="ID")
    perform.add_argument("--priority", type=int, default=0, metavar="N",
                         help="while every slot is busy, higher runs first (default 0)")
    perform.add_argument("--fairness-key", default="", metavar="K",
                         help="a tenant or caller name: keys take turns within a priority")
    perform.add_argument("--queue-timeout", type=int, metavar="MS",
                         help="give up if no slot is free after this long (the task never runs)")
    perform.add_argument("--grace", type=int, metavar="MS",
                         help="tell the task to stop this long before its deadline (default: the task's)")
    perform.add_argument("--follow", action="store_true",
                         help="show progress (a live bar on a terminal) and the task's output as it comes")
    perform.set_defaults(run=_perform)

    watch = commands.add_parser("watch", help="follow a running (or recently finished) execution by request id")
    watch.add_argument("request_id")
    watch.add_argument("--target", metavar="ADDR")
    watch.set_defaults(run=_watch)

    cancel = commands.add_parser("cancel", help="stop an execution by request id")
    cancel.add_argument("request_id")
    cancel.add_argument("--grace", type=int, default=0, metavar="MS",
                        help="tell the task to stop and give it this long before it is killed (default: kill now)")
    cancel.add_argument("--target", metavar="ADDR")
    cancel.set_defaults(run=_cancel)

    tasks = commands.add_parser("tasks", help="list the tasks a daemon serves")
    tasks.add_argument("--target", metavar="ADDR")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    tasks.set_defaults(run=_tasks)


def _perform(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        print(f"task-runner: --options is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(options, dict):
        print("task-runner: --options must be a JSON object", file=sys.stderr)
        return 2
    with Client(args.target) as client:
        kwargs = RequestFields(request_id=args.request_id, priority=args.priority, fairness_key=args.fairness_key,
                               queue_timeout_ms=args.queue_timeout, grace_ms=args.grace)
        if not args.follow:
            return _answer(lambda: client.call(args.task, args.timeout, options, **kwargs))
        timeout_ms = args.timeout
        if timeout_ms is None:  # for the time left: the task's default, as the daemon has it
            with contextlib.suppress(RpcError):
                timeout_ms = next((t.default_timeout_ms for t in client.tasks() if t.name == args.task), None)
        events = client.stream(args.task, args.timeout, options, **kwargs)
        return _answer(lambda: follow(events, timeout_ms / 1e3 if timeout_ms else None))


def _watch(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        return _answer(lambda: follow(client.watch(args.request_id), None))


def _cancel(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        try:
            was_running = client.cancel(args.request_id, args.grace)
        except RpcError as exc:
            return _print_rpc_error(exc)
    print(json.dumps({"request_id": args.request_id, "was_running": was_running}))
    return 0


def _answer(get: Callable[[], TaskResult | None]) -> int:
    """Print the answer `get` returns (or the error it raises) as JSON; the exit code."""
    try:
        answer = get()
    except TaskFailed as exc:
        out: dict[str, Any] = exc.answer.to_json() if exc.answer else {}
        out["error"] = {"kind": exc.kind, "type": exc.type, "message": exc.message,
                        "traceback": exc.traceback, "exit_code": exc.exit_code, "signal": exc.signal,
                        "limit": exc.limit, "notice_given": exc.notice_given}
        print(json.dumps(out, indent=2))
        return 2
    except RpcError as exc:
        return _print_rpc_error(exc)
    except TaskRunnerError as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 2
    if answer is None:
        print("task-runner: the stream ended without an answer", file=sys.stderr)
        return 2
    print(json.dumps(answer.to_json(), indent=2))
    return 0 if answer.outcome else 1


def _print_rpc_error(exc: RpcError) -> int:
    error: dict[str, Any] = {"status": exc.status.name if exc.status else "UNKNOWN", "message": exc.message}
    error.update({k: v for k, v in (("reason", exc.reason), ("retry_delay_s", exc.retry_delay_s),
                                    ("quota", list(exc.quota))) if v})
    print(json.dumps({"error": error}, indent=2))
    return 2


def _tasks(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        try:
            tasks = client.tasks()
        except RpcError as exc:
            print(f"task-runner: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps([dataclasses.asdict(t) for t in tasks], indent=2))
    else:
        for t in tasks:
            note = " (import error)" if t.import_error else ""
            limits = [f"{name} {value:g}" for name, value in (("max_running", t.max_running),
                      ("max_queued", t.max_queued), ("rate_per_s", t.rate_per_s), ("burst", t.burst)) if value]
            admission = f"  [{', '.join(limits)}]" if limits else ""
            sandbox = f"  [sandbox: {t.sandbox}]" if t.sandbox else ""
            print(f"{t.name:<20} {t.default_timeout_ms:>8} ms (max {t.max_timeout_ms} ms)  {t.description}{note}"
                  f"{admission}{sandbox}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`task-runner perform`, `watch`, `cancel` and `tasks`: the client's commands (the daemon's, `serve` and
`check-config`, are in task_runner.server.cli, which builds the whole `task-runner` command).

Every command takes `--target`, `--json` and `--no-retry`. Its output goes to stdout: the answer as
JSON (`perform`, `watch`), a line or a table (`cancel`, `tasks`; JSON with `--json`). An error is one
line on stderr, or, with `--json`, a JSON object on stdout (`{"error": {...}}`, or the answer with its
`error` for a task that failed). A closed stdout (`| head`) ends the command quietly.

Exit codes (EXIT_CODES):
  0    outcome true (or, for cancel and tasks, done)
  1    outcome false: the task's deterministic failure
  2    the task failed (a task error: worth retrying, unless its kind is IMPORT_FAILED)
  3    the call was refused, or the daemon could not be reached (the gRPC status says which)
  64   usage: the command line is wrong (as sysexits' EX_USAGE)
  141  stdout was closed before all was written (as a tool SIGPIPE ended)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from task_runner.client.errors import RpcError, TaskFailed, TaskRunnerError
from task_runner.client.follow import follow
from task_runner.client.results import RequestFields, TaskResult
from task_runner.client.retry import DEFAULT_RETRY, NO_RETRY
from task_runner.client.sync import Client

PROG = "task-runner"
DESCRIPTION = "Run Python tasks in isolated processes over gRPC."
OK, OUTCOME_FALSE, TASK_FAILED, CALL_FAILED, USAGE, CLOSED_PIPE = 0, 1, 2, 3, 64, 141
EXIT_CODES = {OK: "outcome true, or done", OUTCOME_FALSE: "outcome false", TASK_FAILED: "the task failed",
              CALL_FAILED: "the call was refused or the daemon unreachable", USAGE: "usage error",
              CLOSED_PIPE: "stdout was closed"}


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors ending in USAGE (argparse's own 2 is a task failure here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """The client's commands alone: `python -m task_runner.client.cli perform|tasks ...`."""
    parser = Parser(prog=PROG, description=DESCRIPTION)
    add_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    return run(parser, argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse the command line and run its command; its exit code. A closed stdout ends it quietly."""
    args = parser.parse_args(argv)
    try:
        code = int(args.run(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`| head`): say nothing more, and let nothing be flushed at exit to fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE
    return code


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `perform`, `watch`, `cancel` and `tasks` to a `task-runner` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", metavar="ADDR",
                        help="the daemon (default: $TASK_RUNNER_TARGET or 127.0.0.1:50051)")
    common.add_argument("--json", action="store_true", help="print JSON, errors included (on stdout)")
    common.add_argument("--no-retry", action="store_true",
                        help="do not retry a call the daemon refused for now (UNAVAILABLE, RESOURCE_EXHAUSTED)")

    perform = commands.add_parser("perform", parents=[common], help="run a task on a daemon and print the answer")
    perform.add_argument("task")
    perform.add_argument("--timeout", type=int, metavar="MS", help="the task's timeout in ms (default: the task's)")
    perform.add_argument("--options", default="{}", metavar="JSON", help="the task's options, a JSON object")
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
                         help="show progress (a live bar on a terminal), the time left and the task's output")
    perform.set_defaults(run=_perform)

    watch = commands.add_parser("watch", parents=[common],
                                help="follow a running (or recently finished) execution by request id")
    watch.add_argument("request_id")
    watch.set_defaults(run=_watch)

    cancel = commands.add_parser("cancel", parents=[common], help="stop an execution by request id")
    cancel.add_argument("request_id")
    cancel.add_argument("--grace", type=int, default=0, metavar="MS",
                        help="tell the task to stop and give it this long before it is killed (default: kill now)")
    cancel.set_defaults(run=_cancel)

    tasks = commands.add_parser("tasks", parents=[common], help="list the tasks a daemon serves")
    tasks.set_defaults(run=_tasks)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, retry=NO_RETRY if args.no_retry else DEFAULT_RETRY)


def _usage(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return USAGE


def _perform(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        return _usage(f"--options is not JSON: {exc}")
    if not isinstance(options, dict):
        return _usage("--options must be a JSON object")
    with _client(args) as client:
        kwargs = RequestFields(request_id=args.request_id, priority=args.priority, fairness_key=args.fairness_key,
                               queue_timeout_ms=args.queue_timeout, grace_ms=args.grace)
        if not args.follow:
            return _answer(args, lambda: client.call(args.task, args.timeout, options, **kwargs))
        timeout_ms = args.timeout
        if timeout_ms is None:  # for the time left: the task's default, as the daemon has it
            with contextlib.suppress(RpcError):
                timeout_ms = next((t.default_timeout_ms for t in client.tasks() if t.name == args.task), None)
        events = client.stream(args.task, args.timeout, options, **kwargs)
        return _answer(args, lambda: follow(events, timeout_ms / 1e3 if timeout_ms else None))


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _answer(args, lambda: follow(client.watch(args.request_id), None))


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            was_running = client.cancel(args.request_id, args.grace)
        except RpcError as exc:
            return _call_failed(args, exc)
    if args.json:
        print(json.dumps({"request_id": args.request_id, "was_running": was_running}))
    else:
        print(f"{args.request_id}: cancelled ({'it was running' if was_running else 'it was waiting'})")
    return OK


def _answer(args: argparse.Namespace, get: Callable[[], TaskResult | None]) -> int:
    """Print the answer `get` returns as JSON (or the error it raises); the exit code."""
    try:
        answer = get()
    except TaskFailed as exc:
        if args.json:
            out: dict[str, Any] = exc.answer.to_json() if exc.answer else {}
            out["error"] = {"kind": exc.kind, "type": exc.type, "message": exc.message,
                            "traceback": exc.traceback, "exit_code": exc.exit_code, "signal": exc.signal,
                            "limit": exc.limit, "notice_given": exc.notice_given, "retryable": exc.retryable}
            print(json.dumps(out, indent=2))
        else:
            what = f"{exc.type}: {exc.message}" if exc.type and exc.type not in exc.message else exc.message
            print(f"{PROG}: the task failed: {exc.kind}: {what}".replace("\n", " "), file=sys.stderr)
        return TASK_FAILED
    except RpcError as exc:
        return _call_failed(args, exc)
    except TaskRunnerError as exc:
        return _call_failed(args, RpcError(str(exc)))
    if answer is None:
        return _call_failed(args, RpcError("the stream ended without an answer"))
    print(json.dumps(answer.to_json(), indent=2))
    return OK if answer.outcome else OUTCOME_FALSE


def _call_failed(args: argparse.Namespace, exc: RpcError) -> int:
    if args.json:
        error: dict[str, Any] = {"status": exc.status.name if exc.status else "UNKNOWN", "message": exc.message}
        error.update({k: v for k, v in (("reason", exc.reason), ("retry_delay_s", exc.retry_delay_s),
                                        ("quota", list(exc.quota)), ("metadata", exc.metadata)) if v})
        print(json.dumps({"error": error}, indent=2))
    else:
        hints = [f"reason {exc.reason}"] if exc.reason else []
        hints += [f"limit {', '.join(exc.quota)}"] if exc.quota else []
        hints += [f"retry after {exc.retry_delay_s:.1f} s"] if exc.retry_delay_s is not None else []
        hint = f" ({'; '.join(hints)})" if hints else ""
        print(f"{PROG}: {exc}{hint}".replace("\n", " "), file=sys.stderr)
    return CALL_FAILED


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            tasks = client.tasks()
        except RpcError as exc:
            return _call_failed(args, exc)
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
    return OK


if __name__ == "__main__":
    sys.exit(main())

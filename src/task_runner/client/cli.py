"""`task-runner perform`, `watch`, `cancel` and `tasks`: the client's commands (the daemon's, `serve` and
`check-config`, are in task_runner.server.cli, which builds the whole `task-runner` command).

Every command takes `--target`, `--json` and `--no-retry`, before the command or after it. Its output goes to
stdout: the answer as JSON (`perform`, `watch`), a line or a table (`cancel`, `tasks`; JSON with `--json`). An
error is one line on stderr (a failed task's traceback and stderr tail follow it), or, with `--json`, a JSON
object on stdout (`{"error": {...}}`, or the answer with its `error` and a null `outcome` for a task that
failed). A closed stdout (`| head`) ends the command quietly. A valid $TRACEPARENT (and $TRACESTATE) goes with
each call as its W3C trace context, so that a shell script inside a trace passes it on.

Exit codes: EXIT_CODES (sysexits.h's from 64); a failed call's by its gRPC status, in `exit_code`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from task_runner.client.channel import Security
from task_runner.client.errors import RpcError, TaskFailed, TaskRunnerError
from task_runner.client.follow import follow
from task_runner.client.results import RequestFields, TaskResult
from task_runner.client.retry import DEFAULT_RETRY, NO_RETRY
from task_runner.client.sync import Client

PROG = "task-runner"
DISTRIBUTION = "isolated-task-runner"
DESCRIPTION = "Run Python tasks in isolated processes over gRPC."
OK, OUTCOME_FALSE, TASK_FAILED = 0, 1, 2
# sysexits.h's names, for what went wrong with the call itself
USAGE, DATA_ERROR, NO_INPUT, UNAVAILABLE, SOFTWARE, TEMPORARY, NO_PERMISSION = 64, 65, 66, 69, 70, 75, 77
CLOSED_PIPE = 141  # as a tool that SIGPIPE ended
EXIT_CODES = {
    OK: "outcome true (cancel, tasks: done)",
    OUTCOME_FALSE: "outcome false: the task's deterministic failure",
    TASK_FAILED: "the task failed: a task error (worth retrying, unless IMPORT_FAILED)",
    USAGE: "usage: the command line is wrong (EX_USAGE)",
    DATA_ERROR: "the request is invalid: INVALID_ARGUMENT, or too large (EX_DATAERR)",
    NO_INPUT: "no such task or request id: NOT_FOUND (EX_NOINPUT)",
    UNAVAILABLE: "refused for now, or no daemon: UNAVAILABLE, RESOURCE_EXHAUSTED; retry later (EX_UNAVAILABLE)",
    SOFTWARE: "the call failed otherwise: INTERNAL, UNKNOWN, a stream without an answer (EX_SOFTWARE)",
    TEMPORARY: "no answer in time: DEADLINE_EXCEEDED, e.g. --queue-timeout passed, the task never ran (EX_TEMPFAIL)",
    NO_PERMISSION: "not permitted: PERMISSION_DENIED, UNAUTHENTICATED (EX_NOPERM)",
    CLOSED_PIPE: "stdout was closed before all was written",
}
# A failed call's exit code by its gRPC status: the one place they are mapped (any other status: SOFTWARE).
EXIT_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: DATA_ERROR,
    grpc.StatusCode.NOT_FOUND: NO_INPUT,
    grpc.StatusCode.UNAVAILABLE: UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: TEMPORARY,
    grpc.StatusCode.PERMISSION_DENIED: NO_PERMISSION,
    grpc.StatusCode.UNAUTHENTICATED: NO_PERMISSION,
}
TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")  # W3C, version 00
SUMMARY_CHARS, TRACEBACK_LINES, STDERR_LINES, LINE_CHARS = 1000, 40, 20, 500  # what a failure prints, at most


def exit_code(exc: RpcError) -> int:
    """The exit code of a failed call."""
    if exc.status == grpc.StatusCode.RESOURCE_EXHAUSTED and not exc.reason:
        return DATA_ERROR  # a request too large: no retry cures it (a full queue says QUEUE_FULL)
    return EXIT_BY_STATUS.get(exc.status, SOFTWARE) if exc.status else SOFTWARE


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors ending in USAGE (argparse's own 2 is a task failure here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """The client's commands alone: `python -m task_runner.client.cli perform|tasks ...`."""
    parser, commands = new_parser()
    add_commands(commands)
    return run(parser, argv)


def new_parser() -> tuple[Parser, argparse._SubParsersAction[Any]]:
    """The `task-runner` parser, with --version, the client options and the exit codes in its help, and
    its (empty) set of commands."""
    epilog = "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_client_options(parser, before=True)
    return parser, parser.add_subparsers(required=True, metavar="COMMAND")


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _add_client_options(parser: argparse.ArgumentParser, before: bool) -> None:
    """--target, --json and --no-retry: on the parser itself (`before` the command) with their defaults, and on
    each client command without any, so that one given after the command overrides one given before it and one
    not given there leaves it be (argparse copies every attribute of a command's namespace over the parser's)."""
    def default(value: Any) -> Any:
        return value if before else argparse.SUPPRESS

    parser.add_argument("--target", metavar="ADDR", default=default(None),
                        help="the daemon (default: $TASK_RUNNER_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print JSON, errors included (on stdout)")
    parser.add_argument("--no-retry", action="store_true", default=default(False),
                        help="do not retry a call the daemon refused for now (UNAVAILABLE, RESOURCE_EXHAUSTED)")


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
    _add_client_options(common, before=False)

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


@dataclasses.dataclass(frozen=True)
class _Traced(Security):
    """The security the environment sets, and the caller's trace context: each call's metadata carries both."""

    trace: tuple[tuple[str, str], ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return super().metadata() + self.trace


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, _Traced(trace=_shell_trace()), retry=NO_RETRY if args.no_retry else DEFAULT_RETRY)


def _shell_trace() -> tuple[tuple[str, str], ...]:
    """The W3C trace context of the environment ($TRACEPARENT, $TRACESTATE: OpenTelemetry's convention for an
    environment carrier, the daemon's own for its tasks), when $TRACEPARENT is well formed."""
    parent = os.environ.get("TRACEPARENT", "").strip().lower()
    if not parent:
        return ()
    if not TRACEPARENT.fullmatch(parent):
        print(f"{PROG}: $TRACEPARENT is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): not sent",
              file=sys.stderr)
        return ()
    state = os.environ.get("TRACESTATE", "").strip()
    carried = state and state.isascii() and state.isprintable()  # what gRPC metadata can carry
    return (("traceparent", parent),) + ((("tracestate", state),) if carried else ())


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
        events = client.stream(args.task, args.timeout, options, **kwargs)
        return _answer(args, lambda: follow(events, args.timeout / 1e3 if args.timeout else None), followed=True)


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _answer(args, lambda: follow(client.watch(args.request_id)), followed=True)


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


def _answer(args: argparse.Namespace, get: Callable[[], TaskResult | None], followed: bool = False) -> int:
    """Print the answer `get` returns as JSON (or the error it raises); the exit code. `followed`: the task's
    output was shown as it came."""
    try:
        answer = get()
    except TaskFailed as exc:
        if args.json:
            out: dict[str, Any] = exc.answer.to_json() if exc.answer else {}
            out["outcome"] = None  # a task that failed gave no verdict (false would say: deterministic)
            out["error"] = {"kind": exc.kind, "type": exc.type, "message": exc.message,
                            "traceback": exc.traceback, "exit_code": exc.exit_code, "signal": exc.signal,
                            "limit": exc.limit, "notice_given": exc.notice_given, "retryable": exc.retryable}
            print(json.dumps(out, indent=2))
        else:
            _print_failure(exc, followed)
        return TASK_FAILED
    except RpcError as exc:
        return _call_failed(args, exc)
    except TaskRunnerError as exc:
        return _call_failed(args, RpcError(str(exc)))
    if answer is None:
        return _call_failed(args, RpcError("the stream ended without an answer"))
    print(json.dumps(answer.to_json(), indent=2))
    return OK if answer.outcome else OUTCOME_FALSE


def _print_failure(exc: TaskFailed, followed: bool) -> None:
    """A failed task on stderr: one summary line, then its traceback and the tail of its stderr (unless that
    was shown as it came), each cut to its last lines, as a Celery or RQ worker shows a failed job."""
    what = f"{exc.type}: {exc.message}" if exc.type and exc.type not in exc.message else exc.message
    summary = f"{PROG}: the task failed: {exc.kind}: {what}".replace("\n", " ")
    print(_cut(summary, SUMMARY_CHARS), file=sys.stderr)
    if exc.traceback.strip():
        print(_last_lines(exc.traceback, TRACEBACK_LINES, "of the traceback"), file=sys.stderr)
    stderr = exc.answer.stderr.decode(errors="replace") if exc.answer and not followed else ""
    if stderr.strip():
        print(f"{PROG}: the task's stderr, its last lines:", file=sys.stderr)
        print(_last_lines(stderr, STDERR_LINES, "of its stderr"), file=sys.stderr)


def _last_lines(text: str, count: int, of: str) -> str:
    lines = text.rstrip("\n").splitlines()
    shown = [_cut(line, LINE_CHARS) for line in lines[-count:]]
    return "\n".join(([f"[... {len(lines) - count} lines {of} not shown ...]"] if len(lines) > count else []) + shown)


def _cut(line: str, chars: int) -> str:
    return line if len(line) <= chars else f"{line[:chars]} [... {len(line) - chars} characters not shown]"


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
    return exit_code(exc)


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

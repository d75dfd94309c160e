"""`task-runner`: serve a daemon, check its config, perform a task, list tasks.

Exit codes of `perform`: 0 outcome true, 1 outcome false, 2 an error (task or call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from task_runner.client.errors import RpcError, TaskFailed, TaskRunnerError
from task_runner.client.sync import Client

if TYPE_CHECKING:
    from task_runner.server.config import Config


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="task-runner", description="Run Python tasks in isolated processes over gRPC.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", metavar="FILE", help="a TOML config file")
    serve.add_argument("--listen", metavar="ADDR", action="append",
                       help="host:port or unix:/path (repeatable; replaces the config's list)")
    serve.add_argument("--task", metavar="NAME=MODULE:FUNCTION", action="append", default=[],
                       help="register a task (repeatable)")
    serve.add_argument("--max-running", type=int, metavar="N", help="tasks that run at once")
    serve.add_argument("--max-queued", type=int, metavar="N", help="calls that may wait for a slot")
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument("--insecure", action="store_const", const=True,
                       help="allow a non-loopback TCP address without TLS or a token")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    perform = commands.add_parser("perform", help="run a task on a daemon and print the answer as JSON")
    perform.add_argument("task")
    perform.add_argument("--timeout", type=int, metavar="MS", help="the task's timeout in ms (default: the task's)")
    perform.add_argument("--options", default="{}", metavar="JSON", help="the task's options, a JSON object")
    perform.add_argument("--target", metavar="ADDR",
                         help="the daemon (default: $TASK_RUNNER_TARGET or 127.0.0.1:50051)")
    perform.add_argument("--request-id", metavar="ID")
    perform.set_defaults(run=_perform)

    tasks = commands.add_parser("tasks", help="list the tasks a daemon serves")
    tasks.add_argument("--target", metavar="ADDR")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    tasks.set_defaults(run=_tasks)
    return parser


def _server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tasks = {}
    for spec in args.task:
        name, sep, target = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"task-runner: --task {spec!r}: expected NAME=module:function")
        tasks[name] = {"target": target}
    return {
        "listen": args.listen, "tasks": tasks, "max_running": args.max_running,
        "max_queued": args.max_queued, "log_format": args.log_format, "log_level": args.log_level,
        "insecure": args.insecure,
    }


def _serve(args: argparse.Namespace) -> int:
    try:
        from task_runner.server import daemon, logs
        from task_runner.server.config import ConfigError, load
        from task_runner.server.security import SecurityError
    except ImportError as exc:
        print(f"task-runner: the daemon needs the server extra: pip install 'isolated-task-runner[server]' ({exc})",
              file=sys.stderr)
        return 2
    def build() -> Config:
        return load(args.config, **_server_overrides(args))

    try:
        config = build()
    except ConfigError as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    try:
        return asyncio.run(daemon.run(config, reload_config=build))
    except (daemon.StartError, SecurityError) as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 1


def _check_config(args: argparse.Namespace) -> int:
    from task_runner.server.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(config.all_tasks())} tasks, listening on {', '.join(config.listen)})")
    return 0


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
        try:
            answer = client.call(args.task, args.timeout, options, request_id=args.request_id)
        except TaskFailed as exc:
            out: dict[str, Any] = exc.answer.to_json() if exc.answer else {}
            out["error"] = {"kind": exc.kind, "type": exc.type, "message": exc.message,
                            "traceback": exc.traceback, "exit_code": exc.exit_code, "signal": exc.signal,
                            "limit": exc.limit}
            print(json.dumps(out, indent=2))
            return 2
        except RpcError as exc:
            print(json.dumps({"error": {"status": exc.status.name if exc.status else "UNKNOWN",
                                        "message": exc.message}}, indent=2))
            return 2
        except TaskRunnerError as exc:
            print(f"task-runner: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(answer.to_json(), indent=2))
    return 0 if answer.outcome else 1


def _tasks(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        try:
            tasks = client.tasks()
        except RpcError as exc:
            print(f"task-runner: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps([vars(t) for t in tasks], indent=2))
    else:
        for t in tasks:
            note = " (import error)" if t.import_error else ""
            print(f"{t.name:<20} {t.default_timeout_ms:>8} ms (max {t.max_timeout_ms} ms)  {t.description}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

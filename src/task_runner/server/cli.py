"""`task-runner`: the whole command. `serve` and `check-config` are the daemon's, here; `perform`
and `tasks` are the client's (task_runner.client.cli), which needs no server extra.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from task_runner.client import cli as client_cli

if TYPE_CHECKING:
    from task_runner.server.config import Config


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = client_cli.new_parser()
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", metavar="FILE", help="a TOML config file")
    serve.add_argument("--listen", metavar="ADDR", action="append",
                       help="host:port or unix:/path (repeatable; replaces the config's list)")
    serve.add_argument("--task", metavar="NAME=MODULE:FUNCTION", action="append", default=[],
                       help="register a task (repeatable)")
    serve.add_argument("--max-running", type=int, metavar="N", help="tasks that run at once")
    serve.add_argument("--max-queued", type=int, metavar="N", help="calls that may wait for a slot")
    serve.add_argument("--metrics-listen", metavar="ADDR",
                       help="host:port of the Prometheus metrics, or off (replaces the config's)")
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument("--insecure", action="store_const", const=True,
                       help="allow a non-loopback TCP address without TLS or a token")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    client_cli.add_commands(commands)
    return client_cli.run(parser, argv)


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
        "metrics_listen": "" if args.metrics_listen == "off" else args.metrics_listen,
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
    except ConfigError as exc:  # each problem on its line, as check-config says them
        for problem in exc.problems:
            print(f"task-runner: {problem}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format, config.access_log)
    try:
        return asyncio.run(daemon.run(config, reload_config=build))
    except (daemon.StartError, SecurityError) as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 1


def _check_config(args: argparse.Namespace) -> int:
    """Exit codes: 0 serve would start with it and import every task; 2 it would not, or a task does not import
    (each problem on a line of stderr); 64 usage."""
    from task_runner.server import preflight
    from task_runner.server.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as exc:  # what the file says wrongly: each on its line (they name the file)
        for problem in exc.problems:
            print(f"task-runner: {problem}", file=sys.stderr)
        count = len(exc.problems)
        print(f"task-runner: {args.file}: {count} problem{'s' if count > 1 else ''}: serve would not start",
              file=sys.stderr)
        return 2
    refused, broken = preflight.problems(config)
    for problem in refused + broken:
        print(f"task-runner: {args.file}: {problem}", file=sys.stderr)
    if refused or broken:
        verdict = "serve would not start" if refused else "serve would start, and answer their calls IMPORT_FAILED"
        count = len(refused + broken)
        print(f"task-runner: {args.file}: {count} problem{'s' if count > 1 else ''}: {verdict}", file=sys.stderr)
        return 2
    named = f", callers: {', '.join(config.callers)}" if config.callers else ""
    print(f"{args.file}: OK ({len(config.catalogue)} tasks, listening on {', '.join(config.listen)}{named})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `serve` would refuse of a configuration, found without starting: `task-runner check-config`.

Each rule the daemon applies at start is run here, with no side effect (nothing is listened on,
created or claimed), and every problem is reported, not only the first: the user and group tasks
run as, the exposure of the listeners, the TLS files, the callers' tokens, the unix sockets'
directories, each sandbox part the file asks for, and each task's target, imported in a child
process as the fork server imports it, on the same sys.path (so that an import's side effects stay
there, and the error is the one the tasks would have). What serve only warns of (a default sandbox
part this machine cannot set up, a cgroup it cannot use) is not a problem. What depends on the
moment — a TCP port in use, task uids claimed by other daemons — is not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from task_runner.server import sandboxes
from task_runner.server.callers import Callers, CredentialsError, read_token
from task_runner.server.config import Config
from task_runner.server.daemon import StartError, task_owner
from task_runner.server.forkclient import clean_environment
from task_runner.server.security import SecurityError, check_exposure, server_credentials

IMPORT_TIMEOUT_S = 120.0

# Run by a child interpreter: import each target as the fork server does, on the daemon's sys.path, given
# as its arguments (`-c` alone would put the current directory first, where serve does not look); print
# {name: error}.
_IMPORT_ALL = """
import sys
sys.path[:] = sys.argv[1:]
import json, traceback
from task_runner.server.registry import load
errors = {}
for name, target in json.loads(sys.stdin.read()).items():
    try:
        load(target)
    except BaseException as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        errors[name] = lines[-1].strip() if lines else type(exc).__name__
sys.stdout.write("\\n" + json.dumps(errors))
"""


def problems(config: Config) -> tuple[list[str], list[str]]:
    """Everything `serve` would refuse of `config` at start, one line each (none: it would start); and the
    tasks that cannot be imported (serve starts, and answers their calls IMPORT_FAILED)."""
    found: list[str] = []
    for rule in (task_owner, check_exposure, server_credentials):
        try:
            rule(config)
        except (StartError, SecurityError, CredentialsError, OSError) as exc:
            found.append(str(exc))
    found += _token_problems(config)
    for address in config.listen:
        if address.startswith("unix:") and not Path(address.removeprefix("unix:")).parent.is_dir():
            found.append(f"cannot listen on {address}: its directory does not exist")
    try:
        _, failures = sandboxes.build(config)
        found += sandboxes.check(config.catalogue, failures)
    except FileNotFoundError as exc:
        found.append(str(exc))
    broken = []
    for name, error in import_errors(config).items():
        task = config.catalogue.get(name)
        broken.append(f"task {name}: cannot import {task.target}: {error}{_beside_you(task.target, error)}" if task
                      else error)
    return found, broken


def _beside_you(target: str, error: str) -> str:
    """Why a target's module is not found though it is in the current directory, if it is: serve (the
    `task-runner` script) does not search there, unlike `python -c` and `python -m`."""
    top = target.partition(":")[0].partition(".")[0]
    here = Path.cwd()
    searched = {Path(path or ".").resolve() for path in sys.path}
    if not error.startswith("ModuleNotFoundError") or here in searched \
            or not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
        return ""
    found = f"{top}.py" if (here / f"{top}.py").is_file() else f"{top}/"
    return f" ({found} is in the current directory, which serve does not search: set PYTHONPATH=. or install it)"


def _token_problems(config: Config) -> list[str]:
    """Every token serve would fail to read ([auth]'s, each caller's, the metrics one), each on its line; then,
    if all were read, whether two callers share one."""
    sources = [(config.auth.token_file, config.auth.token_env, "[auth]"),
               *((caller.token_file, caller.token_env, f"callers.{name}") for name, caller in config.callers.items()),
               (config.metrics_token_file, None, "metrics_token_file")]
    found = []
    for token_file, token_env, what in sources:
        try:
            read_token(token_file, token_env, what)
        except CredentialsError as exc:
            found.append(str(exc))
    if not found:
        try:
            Callers.of(config)
        except CredentialsError as exc:
            found.append(str(exc))
    return found


def import_errors(config: Config) -> dict[str, str]:
    """The import error of each task whose target cannot be imported, by name (a child process does it)."""
    targets = {name: task.target for name, task in config.catalogue.items()}
    if not targets:
        return {}
    try:
        done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *sys.path], input=json.dumps(targets),
                              capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S,
                              env=clean_environment(config.env_allow))
    except subprocess.TimeoutExpired:
        return {"*": f"importing the tasks took longer than {IMPORT_TIMEOUT_S:.0f} s"}
    try:
        errors: dict[str, str] = json.loads(done.stdout.rsplit("\n", 1)[-1])
    except (json.JSONDecodeError, IndexError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"*": f"the child importing the tasks ended without a verdict: {tail[0]}"}
    return errors

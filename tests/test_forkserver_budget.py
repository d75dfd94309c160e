"""What the fork server imports, every task process pays for at fork and exit (its pages are copied, its
mappings torn down): the budget is pinned here, not only said in a comment."""

from __future__ import annotations

import json
import subprocess
import sys

# Heavy or thread-starting modules no task process needs: OpenSSL (hashlib's libcrypto, ssl), gRPC, asyncio
# (preloaded only when a registered task is async), the daemon's own parts, the daemon's end of the task
# channel among them (the task process's end is task_runner.frames, which the task API shares).
FORBIDDEN = ("hashlib", "_hashlib", "ssl", "_ssl", "grpc", "asyncio", "concurrent", "prometheus_client",
             "opentelemetry", "task_runner.server.daemon", "task_runner.server.service",
             "task_runner.server.execution", "task_runner.server.run", "task_runner.server.answers",
             "task_runner.server.forkclient", "task_runner.server.events", "task_runner.server.sandboxes",
             "task_runner.server.executions", "task_runner.server.answer_cache", "task_runner.client")
# What becoming a task process takes: the sandbox package, one module per concern, behind one sequence.
SANDBOX = tuple(f"task_runner.server.sandbox.{name}" for name in
                ("libc", "profile", "mounts", "network", "pids", "users", "seccomp", "cgroups", "probe", "contain"))


def loaded_by(*modules: str) -> list[str]:
    """sys.modules of a fresh interpreter once it has imported `modules`."""
    script = f"import json, sys\nimport {', '.join(modules)}\nprint(json.dumps(sorted(sys.modules)))"
    names: list[str] = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                                 check=True, cwd="/").stdout)
    return names


def test_the_fork_server_and_its_task_processes_import_nothing_heavy() -> None:
    loaded = loaded_by("task_runner.server.forkserver.server", "task_runner.server.forkserver.task_process")
    heavy = sorted(name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert heavy == [], heavy
    assert "task_runner.frames" in loaded and "task_runner.task" in loaded  # its channel, and the task API
    assert set(SANDBOX) <= set(loaded), sorted(set(SANDBOX) - set(loaded))
    assert len(loaded) < 200, len(loaded)  # 165 today: a new import of weight shows here first


def test_the_init_maker_imports_nothing_of_the_daemon_but_the_ctypes_layer() -> None:
    """Each init is a fork of the init maker: of a few MiB, not of the fork server and its task modules."""
    ours = [name for name in loaded_by("task_runner.server.forkserver.inits") if name.startswith("task_runner")]
    assert ours == ["task_runner", "task_runner.server", "task_runner.server.forkserver",
                    "task_runner.server.forkserver.inits", "task_runner.server.sandbox",
                    "task_runner.server.sandbox.libc"]
    assert "typing" not in loaded_by("task_runner.server.forkserver.inits")

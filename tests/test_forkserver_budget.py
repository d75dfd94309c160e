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
             "task_runner.server.forkclient", "task_runner.server.events", "task_runner.client")


def test_the_fork_server_and_its_task_processes_import_nothing_heavy() -> None:
    loaded = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys\nimport task_runner.server.forkserver, task_runner.server.child\n"
                               "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd="/").stdout)
    heavy = sorted(name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert heavy == [], heavy
    assert "task_runner.frames" in loaded and "task_runner.task" in loaded  # its channel, and the task API
    assert len(loaded) < 200, len(loaded)  # 157 today: a new import of weight shows here first

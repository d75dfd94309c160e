"""isolated-task-runner: run registered Python tasks in isolated processes over gRPC.

`task_runner.client` calls a daemon, `task_runner.server` is the daemon, and
`task_runner.v1` holds the code generated from `protos/task_runner/v1/task_runner.proto`.
"""

__version__ = "0.1.0"

"""The isolated-task-runner daemon: `task-runner serve` or `python -m task_runner.server`.

Needs the `server` extra: `pip install 'isolated-task-runner[server]'`. This package's
`__init__` imports nothing, so that the fork server, which imports `task_runner.server.forkserver.task_process`,
stays small: every module it holds makes each fork slower.
"""

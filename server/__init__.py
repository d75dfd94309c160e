"""The isolated-task-runner daemon: `task-runner serve` or `python -m task_runner.server`.

Needs the `server` extra: `pip install 'isolated-task-runner[server]'`.
"""

from task_runner.server.config import Config, ConfigError, TaskConfig
from task_runner.server.config import load as load_config

__all__ = ["Config", "ConfigError", "TaskConfig", "load_config"]

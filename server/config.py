"""The daemon's configuration: one frozen Config, built once from TOML plus a few CLI overrides."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from task_runner.server.registry import installed_tasks, parse_target

DEFAULT_LISTEN = "127.0.0.1:50051"
MAX_TIMEOUT_MS = 2**32 - 1  # what PerformRequest.timeout_ms can carry


class ConfigError(ValueError):
    """A configuration the daemon refuses to start with; the message names the key and the file."""


@dataclass(frozen=True)
class TaskConfig:
    """One registered task."""

    target: str  # "package.module:function"
    default_timeout_ms: int | None = None  # None: the global default
    max_timeout_ms: int | None = None  # None: the global maximum


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs, validated. Durations carry their unit in the name."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    # How many tasks run at once, and how many more may wait for a slot.
    max_running: int = field(default_factory=lambda: max(4, 4 * (os.cpu_count() or 1)))
    max_queued: int = 1024
    # Task processes forked ahead of demand, so a task does not wait for fork().
    spare_processes: int = 4
    default_timeout_ms: int = 30_000
    max_timeout_ms: int = 3_600_000
    result_max_bytes: int = 1 << 20
    output_tail_bytes: int = 16 << 10
    max_request_bytes: int = 4 << 20
    # Environment variables (names or fnmatch patterns) passed from the daemon to tasks.
    env_allow: tuple[str, ...] = (
        "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "HOME", "USER", "LOGNAME", "TMPDIR",
        "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV",
    )
    # Load tasks that installed packages register under the `task_runner.tasks` entry points.
    entry_points: bool = True
    tasks: Mapping[str, TaskConfig] = field(default_factory=dict)
    drain_grace_s: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json"

    def all_tasks(self) -> dict[str, TaskConfig]:
        """The tasks to serve: installed entry points (if enabled), overridden by explicit ones."""
        found = {name: TaskConfig(target) for name, target in installed_tasks().items()} if self.entry_points else {}
        found.update(self.tasks)
        return found

    def timeouts_ms(self, task: TaskConfig) -> tuple[int, int]:
        """The (default, maximum) timeout of a task."""
        maximum = task.max_timeout_ms if task.max_timeout_ms is not None else self.max_timeout_ms
        default = task.default_timeout_ms if task.default_timeout_ms is not None else self.default_timeout_ms
        return min(default, maximum), maximum


def load(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Build the Config from a TOML file (optional) and CLI overrides (None values ignored).

    Raises:
        ConfigError: for unknown keys, wrong types or bad values, naming the key and the file.
    """
    where = str(path) if path else "the command line"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    extra_tasks = overrides.pop("tasks", None) or {}
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    if extra_tasks:
        data["tasks"] = {**data.get("tasks", {}), **extra_tasks}
    return _build(data, where)


def _build(data: dict[str, Any], where: str) -> Config:
    hints = typing.get_type_hints(Config)
    known = {f.name for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        if key == "tasks":
            kwargs[key] = _tasks(value, where)
        else:
            kwargs[key] = _check(value, hints[key], key, where)
    config = Config(**kwargs)
    _validate(config, where)
    return config


def _tasks(value: Any, where: str) -> dict[str, TaskConfig]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'tasks' must be a table of name = \"module:function\" or [tasks.NAME]")
    hints = typing.get_type_hints(TaskConfig)
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    tasks = {}
    for name, entry in value.items():
        key = f"tasks.{name}"
        table = {"target": entry} if isinstance(entry, str) else entry
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {key!r} must be \"module:function\" or a table")
        for sub in table:
            if sub not in known:
                raise ConfigError(f"{where}: unknown key {key + '.' + sub!r} (known: {', '.join(sorted(known))})")
        if "target" not in table:
            raise ConfigError(f"{where}: {key!r} needs a 'target' = \"module:function\"")
        task = TaskConfig(**{k: _check(v, hints[k], f"{key}.{k}", where) for k, v in table.items()})
        try:
            parse_target(task.target)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key + '.target'!r}: {exc}") from exc
        tasks[name] = task
    return tasks


def _check(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check a TOML value against a field's type hint; lists become tuples, ints may be floats."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        for option in options:
            try:
                return _check(value, option, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key!r} must be a list, got {type(value).__name__}")
        return tuple(_check(v, item, key, where) for v in value)
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: {key!r} must be empty")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(config: Config, where: str) -> None:
    positive = ("max_running", "result_max_bytes", "max_request_bytes", "default_timeout_ms", "max_timeout_ms")
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{where}: {key!r} must be above 0")
    for key in ("max_queued", "spare_processes", "output_tail_bytes"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{where}: {key!r} must not be negative")
    if config.max_timeout_ms > MAX_TIMEOUT_MS:
        raise ConfigError(f"{where}: 'max_timeout_ms' must be at most {MAX_TIMEOUT_MS}")
    if config.drain_grace_s < 0:
        raise ConfigError(f"{where}: 'drain_grace_s' must not be negative")
    if not config.listen:
        raise ConfigError(f"{where}: 'listen' needs at least one address")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"{where}: 'log_format' must be \"text\" or \"json\"")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    for name, task in config.tasks.items():
        for key in ("default_timeout_ms", "max_timeout_ms"):
            value = getattr(task, key)
            if value is not None and not 0 < value <= MAX_TIMEOUT_MS:
                raise ConfigError(f"{where}: 'tasks.{name}.{key}' must be between 1 and {MAX_TIMEOUT_MS}")

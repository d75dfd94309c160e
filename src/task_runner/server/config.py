"""The daemon's configuration: one frozen Config, built once from TOML plus a few CLI overrides."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from task_runner import frames
from task_runner.server.admission import TaskRules
from task_runner.server.registry import installed_tasks, parse_target
from task_runner.server.uids import parse_range

DEFAULT_LISTEN = "127.0.0.1:50051"
MAX_TIMEOUT_MS = 2**32 - 1  # what PerformRequest.timeout_ms can carry
MIB = 1 << 20
DEFAULT_PROCESSES = 256  # processes and threads a task's tree may hold at once, unless [limits] says otherwise
CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # it goes into log lines and metric labels
_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration the daemon refuses to start with: every problem found (`problems`, one a line in its
    message), each naming the key and the file."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Said(Exception):
    """A value whose problems are listed already: its key is left out, and the rest is still checked."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of a task process; None is no limit. Set globally, overridable per task."""

    memory_mb: int | None = None  # address space added (RLIMIT_AS), and cgroup memory.max when available
    cpu_s: int | None = None  # CPU seconds (RLIMIT_CPU)
    open_files: int | None = 1024  # RLIMIT_NOFILE
    # cgroup pids.max when available, else RLIMIT_NPROC, which the kernel counts per user (threads too) and
    # never applies to root: so the default binds a task with a cgroup or a uid of its own; one set in the
    # file binds a shared uid too (all its processes together).
    processes: int | None = DEFAULT_PROCESSES
    file_size_mb: int | None = None  # the largest file a task may write (RLIMIT_FSIZE)
    # The largest core dump it may leave (RLIMIT_CORE); None: none at all, the hard limit 0 too, so that no
    # task (nor anything it runs) raises it: a core holds the memory of a process that had a request's data.
    core_mb: int | None = None

    def merged(self, override: Limits | None) -> Limits:
        """These limits with `override`'s set fields taking precedence."""
        return _merged(self, override)

    @property
    def explicit(self) -> frozenset[str]:
        return explicit(self)


@dataclass(frozen=True)
class SandboxConfig:
    """A task's sandbox (task_runner.server.sandbox); set for every task, overridable per task key by key."""

    filesystem: str = "private"  # "private" | "host"
    network: str = "host"  # "none" | "host"
    processes: str = "private"  # "private" | "host"
    syscalls: str = "default"  # "default" | "off"
    tmp_mb: int = 256  # its private /tmp, /var/tmp and /dev/shm, together
    hide: tuple[str, ...] = ()  # more paths it must not see (the daemon's own secrets are always hidden)
    writable: tuple[str, ...] = ()  # paths it may write besides its own

    CHOICES: typing.ClassVar[dict[str, tuple[str, str]]] = {  # key -> (sandboxed, not)
        "filesystem": ("private", "host"), "network": ("none", "host"), "processes": ("private", "host"),
        "syscalls": ("default", "off"),
    }

    def merged(self, override: SandboxConfig | None) -> SandboxConfig:
        """This sandbox with `override`'s set keys taking precedence (explicit where either set a key), but for
        `hide`: a task's adds to this one's, it never takes a path out of what every task must not see."""
        merged = _merged(self, override)
        if override is not None and "hide" in override.explicit:
            object.__setattr__(merged, "hide", tuple(dict.fromkeys((*self.hide, *override.hide))))
        return merged

    def sandboxed(self, part: str) -> bool:
        return bool(getattr(self, part) == self.CHOICES[part][0])

    @property
    def explicit(self) -> frozenset[str]:
        return explicit(self)


def explicit(settings: object) -> frozenset[str]:
    """The keys of a config table its file set (not defaults)."""
    return frozenset(getattr(settings, "_explicit", frozenset()))


def _merged(base: _T, override: _T | None) -> _T:
    """`base` with the keys `override`'s table set taking precedence; explicit: the keys either set."""
    if override is None:
        return base
    keys = explicit(override)
    merged = dataclasses.replace(base, **{key: getattr(override, key) for key in keys})  # type: ignore[type-var]
    object.__setattr__(merged, "_explicit", explicit(base) | keys)
    return merged


@dataclass(frozen=True)
class TaskConfig:
    """One registered task."""

    target: str  # "package.module:function"
    default_timeout_ms: int | None = None  # None: the global default
    max_timeout_ms: int | None = None  # None: the global maximum
    limits: Limits | None = None  # None: the global limits; else these keys override them
    # Admission: at most this many of it run at once (None: as many as there are slots) ...
    max_running: int | None = None
    # ... and wait (None: as many as the daemon's queue holds);
    max_queued: int | None = None
    # it starts at most rate_per_s a second on average, burst at once (a token bucket; None: no rate).
    rate_per_s: float | None = None
    burst: int | None = None  # None: 1
    # Told to stop this long before its deadline (a request's grace_ms overrides it); 0: not told.
    grace_ms: int = 0
    # Once it has sent a heartbeat (or progress), killed as STALLED after this long without one.
    heartbeat_timeout_ms: int | None = None
    sandbox: SandboxConfig | None = None  # None: the global sandbox; else these keys override it
    # Its output tails go into the log when it succeeds, too (a failure's stderr tail always does).
    log_output: bool = False


@dataclass(frozen=True)
class Task:
    """A task as the daemon serves it: its entry resolved against the defaults, built once per load."""

    name: str
    target: str  # "package.module:function"
    default_timeout_ms: int
    max_timeout_ms: int
    limits: Limits  # the global limits with the task's own on top
    admission: TaskRules = field(default_factory=TaskRules)  # its own admission limits
    grace_ms: int = 0  # its notice before the deadline, unless a request says otherwise
    heartbeat_timeout_ms: int | None = None
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # the global sandbox with its own keys on top
    log_output: bool = False  # its output is logged when it succeeds too

    def process_limits(self) -> frames.Limits:
        """The limits its task process sets on itself (bytes for sizes)."""
        limits = self.limits

        def value(v: int | None, scale: int = 1) -> int:
            return frames.NO_LIMIT if v is None else v * scale
        return frames.Limits(value(limits.memory_mb, MIB), value(limits.cpu_s), value(limits.open_files),
                             value(limits.processes), value(limits.file_size_mb, MIB),
                             0 if limits.core_mb is None else limits.core_mb * MIB)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for TCP listeners; with client_ca_file, clients must present a certificate it signed (mTLS)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token authentication: the token comes from a file or an environment variable, never argv."""

    token_file: str | None = None
    token_env: str | None = None

    @property
    def enabled(self) -> bool:
        return self.token_file is not None or self.token_env is not None


@dataclass(frozen=True)
class CallerConfig:
    """A named caller: how it proves who it is, what it may run and see, and its share of the queue."""

    tasks: tuple[str, ...]  # the tasks it may run; "*": all
    token_file: str | None = None  # a bearer token, from a file or an environment variable ...
    token_env: str | None = None
    tls_identity: str | None = None  # ... or its client certificate: a URI or DNS SAN, or "CN=name"
    see_all: bool = False  # may Watch and Cancel other callers' calls
    # Admission, for its calls together: as a task's own limits are for the task's.
    max_running: int | None = None
    max_queued: int | None = None
    rate_per_s: float | None = None
    burst: int | None = None  # None: 1

    @property
    def rules(self) -> TaskRules:
        return TaskRules(self.max_running, self.max_queued, self.rate_per_s, self.burst or 1)


# The keys a reload (SIGHUP) cannot apply, read once at start: the listeners and their TLS, the
# daemon-wide queue and message sizes, the task uids and the users, the working directories and
# cgroups, the metrics listener, the idempotency cache and the logs. A change to one is logged on
# reload, and the running value kept. Everything else (the tasks and their limits, sandboxes and
# timeouts, the callers and [auth]'s token, the priority bounds, drain_grace_s, env_allow, the
# daemon-wide limits of a task) applies to calls that arrive after the reload.
RESTART_KEYS = (
    "listen", "insecure", "unix_socket_mode", "unix_socket_user", "unix_socket_group", "tls", "max_running",
    "max_queued", "priority_aging_s", "max_queued_bytes", "max_pending_rpcs", "max_request_bytes",
    "result_max_bytes", "output_tail_bytes", "run_as_user", "run_as_group", "task_uids", "spare_processes",
    "workdir_base", "cgroup", "metrics_listen", "metrics_token_file", "idempotency_window_s",
    "idempotency_max_entries", "log_level", "log_format", "access_log",
)


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "{" + ", ".join(f"{k} = {_shown(v)}" for k, v in dataclasses.asdict(value).items() if v) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) or value is None else str(value)


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs, validated. Durations carry their unit in the name."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    # Listening on a non-loopback TCP address without TLS or a token is refused unless this is set.
    insecure: bool = False
    unix_socket_mode: str = "0660"  # octal, for unix: listeners
    unix_socket_user: str | None = None  # owner of unix sockets (the daemon's user if unset)
    unix_socket_group: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Named callers, each with its credentials and rights ([auth]'s token is the caller "default").
    callers: Mapping[str, CallerConfig] = field(default_factory=dict)
    # How many tasks run at once, and how many more may wait for a slot.
    max_running: int = field(default_factory=lambda: max(4, 4 * (os.cpu_count() or 1)))
    max_queued: int = 1024
    # The priorities a request may ask for, and how fast a waiting call's priority rises: by one for
    # each priority_aging_s it has waited (so that nothing starves).
    min_priority: int = -10
    max_priority: int = 10
    priority_aging_s: float = 10.0
    # The bytes of requests that may wait for a task process at once (each is held as it came, once).
    max_queued_bytes: int = 256 << 20
    # Calls gRPC has accepted but the daemon has not yet looked at (a burst). Beyond this gRPC
    # itself cancels new calls (status CANCELLED) before the daemon can answer RESOURCE_EXHAUSTED.
    max_pending_rpcs: int = 10_000
    # Task processes forked ahead of demand, so a task does not wait for fork().
    spare_processes: int = 4
    default_timeout_ms: int = 30_000
    max_timeout_ms: int = 3_600_000
    limits: Limits = field(default_factory=Limits)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    result_max_bytes: int = 1 << 20
    output_tail_bytes: int = 16 << 10
    max_request_bytes: int = 4 << 20
    # When the daemon runs as root, tasks (and the fork server) run as this user and group.
    run_as_user: str | None = None
    run_as_group: str | None = None
    # With run_as_user, each task process runs under a uid of its own from this block: "auto" (a free
    # block of 4096 unnamed uids from 0x70000000), "FIRST-LAST", or "off" (all as run_as_user).
    task_uids: str = "auto"
    # Each task gets a fresh, empty working directory under this one, removed after it.
    workdir_base: str | None = None  # None: $TMPDIR/task-runner-UID
    # A cgroup v2 directory the daemon may create task cgroups in: "auto" (its own, if writable), "off", or a path.
    cgroup: str = "auto"
    # Environment variables (names or fnmatch patterns) passed from the daemon to tasks.
    env_allow: tuple[str, ...] = (
        "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "HOME", "USER", "LOGNAME", "TMPDIR",
        "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV",
    )
    # Load tasks that installed packages register under the `task_runner.tasks` entry points.
    entry_points: bool = True
    tasks: Mapping[str, TaskConfig] = field(default_factory=dict)
    # Prometheus metrics over HTTP on this host:port; None: off. A non-loopback one needs a bearer token
    # (metrics_token_file) or insecure = true; with a token file, every scrape must present its token.
    metrics_listen: str | None = None
    metrics_token_file: str | None = None
    drain_grace_s: float = 30.0
    # Answers for a request_id are kept this long (and at most this many) for retries to find.
    idempotency_window_s: float = 300.0
    idempotency_max_entries: int = 10_000
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json"
    # One line per finished call on the logger "task_runner.access", at INFO whatever log_level says.
    access_log: bool = True

    @functools.cached_property
    def catalogue(self) -> Mapping[str, Task]:
        """The tasks to serve, by name: installed entry points (if enabled), overridden by explicit ones.

        Built once per Config, that is once per load: scanning entry points is slow.
        """
        found = {name: TaskConfig(target) for name, target in installed_tasks().items()} if self.entry_points else {}
        found.update(self.tasks)
        return types.MappingProxyType({
            name: Task(name, entry.target, *self.timeouts_ms(entry), self.limits.merged(entry.limits),
                       TaskRules(entry.max_running, entry.max_queued, entry.rate_per_s, entry.burst or 1),
                       entry.grace_ms, entry.heartbeat_timeout_ms, self.sandbox.merged(entry.sandbox),
                       entry.log_output)
            for name, entry in sorted(found.items())
        })

    def keeping(self, running: Config) -> tuple[Config, list[str]]:
        """This config as a reload applies it to a daemon `running` another: with the keys only a restart
        applies (RESTART_KEYS) kept as they are, and a line for each such key that changed."""
        kept: dict[str, Any] = {}
        said = []
        for key in RESTART_KEYS:
            old, new = getattr(running, key), getattr(self, key)
            if old != new:
                kept[key] = old
                said.append(f"{key}: {_shown(old)} → {_shown(new)} needs a restart; kept {_shown(old)}")
        return (dataclasses.replace(self, **kept) if kept else self), said

    def timeouts_ms(self, task: TaskConfig) -> tuple[int, int]:
        """The (default, maximum) timeout of a task."""
        maximum = task.max_timeout_ms if task.max_timeout_ms is not None else self.max_timeout_ms
        default = task.default_timeout_ms if task.default_timeout_ms is not None else self.default_timeout_ms
        return min(default, maximum), maximum


def load(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Build the Config from a TOML file (optional) and CLI overrides (None values ignored; "" ones restore the
    key's default).

    Raises:
        ConfigError: for unknown keys, wrong types or bad values, each naming the key and the file: all of
            them (but a file that is not TOML: its first syntax error).
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
        if value == "":  # an empty override takes the key's default (e.g. --metrics-listen off)
            data.pop(key, None)
        elif value is not None:
            data[key] = value
    if extra_tasks:
        data["tasks"] = {**data.get("tasks", {}), **extra_tasks}
    problems: list[str] = []
    config = _dataclass(Config, data, "", where, problems)
    if config is None:
        raise ConfigError(problems)
    object.__setattr__(config, "_file", str(Path(path).resolve()) if path is not None else None)
    object.__setattr__(config, "_given", os.path.abspath(path) if path is not None else None)  # (symlinks kept)
    _validate(config, where, problems)
    # Here, not at the top: sandboxes builds on this module. It knows what is hidden from tasks.
    from task_runner.server.sandboxes import unwritable
    problems += unwritable(config, where)
    if problems:
        raise ConfigError(problems)
    return config


def config_file(config: Config, as_given: bool = False) -> str | None:
    """The file `config` was loaded from, if any (its tasks never see it: see sandboxes.hidden_paths): its real
    path, or `as_given` (absolute, its symlinks kept: a Kubernetes ConfigMap's path is a symlink into it)."""
    file: str | None = getattr(config, "_given" if as_given else "_file", None)
    return file


def _dataclass(cls: type[_T], data: Any, prefix: str, where: str, problems: list[str]) -> _T | None:
    """Build a config dataclass from a TOML table; an unknown key or a wrong type is a problem, and left out.
    None (its problems listed): it is not a table, or lacks a required key."""
    if not isinstance(data, dict):
        problems.append(f"{where}: {prefix.rstrip('.') or 'the file'!r} must be a table")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # cls is always a dataclass
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"{where}: unknown key {prefix + key!r} (known: {', '.join(sorted(known))})")
            continue
        try:
            kwargs[key] = _value(value, hints[key], prefix + key, where, problems)
        except ConfigError as exc:
            problems += exc.problems
        except _Said:
            pass
    try:
        built = cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        problems.append(f"{where}: {prefix.rstrip('.')!r}: {exc}")
        return None
    object.__setattr__(built, "_explicit", frozenset(kwargs))  # which keys the file set (for merging)
    return built


def _value(value: Any, hint: Any, key: str, where: str, problems: list[str]) -> Any:
    """Check a TOML value against a field's type hint; lists become tuples, ints may be floats.

    Raises:
        ConfigError: it is of the wrong type.
        _Said: a table in it is wrong, and `problems` says how.
    """
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return _value(value, options[0], key, where, problems) if len(options) == 1 else value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        built = _dataclass(hint, value, key + ".", where, problems)
        if built is None:
            raise _Said
        return built
    if origin is Mapping:  # tasks (name = "module:function" or a [tasks.NAME] table), callers
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key!r} must be a table")
        entry_type = typing.get_args(hint)[1]
        tables = {}
        for name, entry in value.items():
            table = {"target": entry} if isinstance(entry, str) and entry_type is TaskConfig else entry
            built = _dataclass(entry_type, table, f"{key}.{name}.", where, problems)
            if built is None:
                continue
            tables[name] = built
            if isinstance(built, TaskConfig):
                try:
                    parse_target(built.target)
                except ValueError as exc:  # the task is kept: a caller naming it is no second problem
                    problems.append(f"{where}: {f'{key}.{name}.target'!r}: {exc}")
        return tables
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key!r} must be a list, got {type(value).__name__}")
        return tuple(_value(v, typing.get_args(hint)[0], key, where, problems) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(config: Config, where: str, problems: list[str]) -> None:
    positive = ("max_pending_rpcs", "max_running", "result_max_bytes", "max_request_bytes", "default_timeout_ms",
                "max_timeout_ms")
    for key in positive:
        if getattr(config, key) <= 0:
            problems.append(f"{where}: {key!r} must be above 0")
    for key in ("max_queued", "spare_processes", "output_tail_bytes"):
        if getattr(config, key) < 0:
            problems.append(f"{where}: {key!r} must not be negative")
    if config.max_queued_bytes < config.max_request_bytes:
        problems.append(
            f"{where}: 'max_queued_bytes' must be at least 'max_request_bytes' ({config.max_request_bytes})",
        )
    if config.task_uids not in ("auto", "off"):
        try:
            parse_range(config.task_uids)
        except ValueError as exc:
            problems.append(f"{where}: 'task_uids': {exc}")
    if config.max_timeout_ms > MAX_TIMEOUT_MS:
        problems.append(f"{where}: 'max_timeout_ms' must be at most {MAX_TIMEOUT_MS}")
    if config.drain_grace_s < 0:
        problems.append(f"{where}: 'drain_grace_s' must not be negative")
    if not config.listen:
        problems.append(f"{where}: 'listen' needs at least one address")
    if config.log_format not in ("text", "json"):
        problems.append(f"{where}: 'log_format' must be \"text\" or \"json\"")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"{where}: 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    try:
        if not 0 <= int(config.unix_socket_mode, 8) <= 0o777:
            raise ValueError
    except ValueError:
        problems.append(f"{where}: 'unix_socket_mode' must be an octal mode like \"0660\"")
    if config.tls.enabled != (config.tls.key_file is not None):
        problems.append(f"{where}: 'tls.cert_file' and 'tls.key_file' go together")
    if config.tls.client_ca_file and not config.tls.enabled:
        problems.append(f"{where}: 'tls.client_ca_file' needs 'tls.cert_file' and 'tls.key_file'")
    scopes = [("limits", config.limits)] + [(f"tasks.{n}.limits", t.limits) for n, t in config.tasks.items()]
    for scope, limits in scopes:
        for f in dataclasses.fields(Limits):
            value = getattr(limits, f.name) if limits is not None else None
            if value is not None and value <= 0:
                problems.append(f"{where}: '{scope}.{f.name}' must be above 0")
    if not config.min_priority <= 0 <= config.max_priority:
        problems.append(f"{where}: 'min_priority' and 'max_priority' must hold 0, the default priority")
    if config.priority_aging_s <= 0:
        problems.append(f"{where}: 'priority_aging_s' must be above 0")
    sandboxes = [("sandbox", config.sandbox)] + [
        (f"tasks.{n}.sandbox", t.sandbox) for n, t in config.tasks.items() if t.sandbox is not None]
    for scope, sandbox in sandboxes:
        for key, choices in SandboxConfig.CHOICES.items():
            if getattr(sandbox, key) not in choices:
                problems.append(f"{where}: '{scope}.{key}' must be \"{choices[0]}\" or \"{choices[1]}\"")
        if sandbox.tmp_mb <= 0:
            problems.append(f"{where}: '{scope}.tmp_mb' must be above 0")
        for key in ("hide", "writable"):
            for path in getattr(sandbox, key):
                if not os.path.isabs(path):
                    problems.append(f"{where}: '{scope}.{key}': {path!r} is not an absolute path")
    for name, task in config.tasks.items():
        _validate_share(task, f"tasks.{name}", where, problems)
        for key, low in (("grace_ms", 0), ("heartbeat_timeout_ms", 1)):
            value = getattr(task, key)
            if value is not None and value < low:
                problems.append(f"{where}: 'tasks.{name}.{key}' must be at least {low}")
        for key in ("default_timeout_ms", "max_timeout_ms"):
            value = getattr(task, key)
            if value is not None and not 0 < value <= MAX_TIMEOUT_MS:
                problems.append(f"{where}: 'tasks.{name}.{key}' must be between 1 and {MAX_TIMEOUT_MS}")
    _validate_callers(config, where, problems)
    _validate_metrics(config, where, problems)


def _validate_share(entry: TaskConfig | CallerConfig, scope: str, where: str, problems: list[str]) -> None:
    """A task's or a caller's admission limits."""
    for key, low in (("max_running", 1), ("max_queued", 0), ("burst", 1)):
        value = getattr(entry, key)
        if value is not None and value < low:
            problems.append(f"{where}: '{scope}.{key}' must be at least {low}")
    if entry.rate_per_s is not None and not entry.rate_per_s > 0:
        problems.append(f"{where}: '{scope}.rate_per_s' must be above 0")
    if entry.burst is not None and entry.rate_per_s is None:
        problems.append(f"{where}: '{scope}.burst' needs '{scope}.rate_per_s'")


def _validate_callers(config: Config, where: str, problems: list[str]) -> None:
    """Each caller's name, credentials and tasks; no two callers with the same certificate identity.
    (Tokens are compared once read: task_runner.server.callers.)"""
    identities: dict[str, str] = {}
    for name, caller in config.callers.items():
        scope = f"callers.{name}"
        if not CALLER_NAME.fullmatch(name):
            problems.append(f"{where}: '{scope}': a caller's name is 1-64 letters, digits, '_', '.' or '-'")
        if name == "default" and config.auth.enabled:
            problems.append(f"{where}: '{scope}': [auth]'s token is the caller \"default\"; name this one otherwise")
        _validate_share(caller, scope, where, problems)
        if caller.token_file is not None and caller.token_env is not None:
            problems.append(f"{where}: '{scope}': token_file or token_env, not both")
        if caller.token_file is None and caller.token_env is None and caller.tls_identity is None:
            problems.append(f"{where}: '{scope}' needs token_file, token_env or tls_identity: how it proves "
                            "who it is")
        if caller.tls_identity is not None:
            if not config.tls.client_ca_file:
                problems.append(f"{where}: '{scope}.tls_identity' needs client certificates "
                                "('tls.client_ca_file')")
            other = identities.setdefault(caller.tls_identity, name)
            if other != name:
                problems.append(f"{where}: callers {other} and {name} have the same tls_identity "
                                f"{caller.tls_identity!r}")
        if not caller.tasks:
            problems.append(f"{where}: '{scope}.tasks' is empty: list the tasks it may run, or [\"*\"] for all")
        if "*" not in caller.tasks:
            unknown = sorted(set(caller.tasks) - set(config.catalogue))
            if unknown:
                problems.append(f"{where}: '{scope}.tasks': no task named {', '.join(unknown)} "
                                f"(tasks: {', '.join(list(config.catalogue)[:20])})")


def _validate_metrics(config: Config, where: str, problems: list[str]) -> None:
    """The metrics listener: host:port, and on a non-loopback address a token (or the operator's `insecure`)."""
    from task_runner.server.security import is_loopback  # (security imports this module)

    address = config.metrics_listen
    if address is None:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"{where}: 'metrics_listen' must be host:port, like \"127.0.0.1:9464\"; got {address!r}")
        return
    if not is_loopback(address) and config.metrics_token_file is None and not config.insecure:
        problems.append(
            f"{where}: 'metrics_listen' = {address!r} is not a loopback address, and no 'metrics_token_file' is "
            "set: anyone who can reach it (a task with network = \"host\" too) could read the metrics. Set "
            "metrics_token_file (a bearer token every scrape must send), listen on 127.0.0.1, or set insecure = "
            "true to accept that.",
        )

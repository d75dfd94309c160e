"""The daemon's side of the tasks' sandboxes: the profiles of a configuration, and what could not be set up.

A generation's tasks have few distinct sandboxes (usually one): each becomes a `Profile`, an index
the fork server forks spares by. The seccomp filter is built here, once (task_runner.server.sandbox.seccomp);
the fork server tries every part at its start (task_runner.server.sandbox.probe), and `check` turns
what this machine could not set up into a refusal (a part the config asked for by name) or a warning.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from task_runner.server.config import Config, SandboxConfig, Task, config_file
from task_runner.server.sandbox import seccomp
from task_runner.server.sandbox.profile import PARTS, Profile
from task_runner.v1.task_runner_pb2 import Sandbox

log = logging.getLogger("task_runner.server")
MIB = 1 << 20


@dataclass(frozen=True)
class Sandboxes:
    """The distinct sandbox profiles of a generation's tasks, and which is whose."""

    profiles: tuple[Profile, ...]
    of_task: Mapping[str, int]  # task name -> its profile's index
    busiest: int = 0  # the profile of the most tasks: it keeps spares from the start
    hidden: frozenset[str] = frozenset()  # the daemon's secrets every private filesystem hides (hidden_paths)

    @classmethod
    def none(cls, tasks: Mapping[str, object]) -> Sandboxes:
        return cls((Profile(),), dict.fromkeys(tasks, 0))

    def without(self, parts: set[str]) -> Sandboxes:
        """These profiles without the parts this machine cannot set up."""
        return Sandboxes(tuple(profile.without(parts) for profile in self.profiles), self.of_task, self.busiest,
                         self.hidden)

    @property
    def private(self) -> bool:
        """Some of its tasks have a private filesystem, so hidden paths."""
        return any(profile.filesystem for profile in self.profiles)


def message(profile: Profile) -> Sandbox:
    """A profile as ListTasks shows it: what a private filesystem hides and leaves writable, real paths."""
    choices = SandboxConfig.CHOICES
    private = profile.filesystem  # (on the host's filesystem nothing is hidden, and nothing read-only for it)
    return Sandbox(**{part: choices[part][0 if part in profile.parts else 1] for part in PARTS},
                   tmp_mb=profile.tmp_bytes // MIB if private else 0,
                   writable=profile.writable if private else (), hide=profile.hide if private else ())


@functools.cache
def _seccomp_programs() -> tuple[bytes, bytes] | str:
    """The filter, built once per daemon, for tasks with the network and without (refusing vsock too); or
    why it cannot be."""
    try:
        return seccomp.program(), seccomp.program(no_vsock=True)
    except seccomp.SeccompUnavailable as exc:
        return str(exc)


def build(config: Config) -> tuple[Sandboxes, dict[str, str]]:
    """The profiles of `config`'s tasks, and the parts that cannot be set up here for want of a filter.

    Raises:
        FileNotFoundError: for a `writable` path that does not exist (the message names the task).
    """
    hidden = hidden_paths(config)
    failures: dict[str, str] = {}
    programs = (b"", b"")  # by network = "none"
    if any(task.sandbox.sandboxed("syscalls") for task in config.catalogue.values()):
        built = _seccomp_programs()
        if isinstance(built, str):
            failures["syscalls"] = built
        else:
            programs = built
    index: dict[Profile, int] = {}
    of_task: dict[str, int] = {}
    for name, task in config.catalogue.items():
        sandbox = task.sandbox
        for path in sandbox.writable:
            if not os.path.exists(path):
                raise FileNotFoundError(f"sandbox.writable of task {name}: {path} does not exist")
        profile = Profile(
            filesystem=sandbox.sandboxed("filesystem"), network=sandbox.sandboxed("network"),
            processes=sandbox.sandboxed("processes"),
            seccomp=programs[sandbox.sandboxed("network")] if sandbox.sandboxed("syscalls") else b"",
            tmp_bytes=sandbox.tmp_mb * MIB,
            hide=tuple(sorted({*hidden, *(os.path.realpath(path) for path in sandbox.hide)})),
            writable=tuple(os.path.realpath(path) for path in sandbox.writable),
        )
        of_task[name] = index.setdefault(profile, len(index))
    if not index:
        return Sandboxes.none({}), failures
    busiest = collections.Counter(of_task.values()).most_common(1)[0][0]
    return Sandboxes(tuple(index), of_task, busiest, frozenset(hidden)), failures


def secret_files(config: Config) -> dict[str, str]:
    """The files of `config` that hold a secret, by the key that names each: as configured, made absolute."""
    files = {"the config file": config_file(config, as_given=True), "[auth]'s token_file": config.auth.token_file,
             "tls.key_file": config.tls.key_file, "metrics_token_file": config.metrics_token_file,
             **{f"callers.{name}.token_file": caller.token_file for name, caller in config.callers.items()}}
    return {what: os.path.abspath(file) for what, file in files.items() if file}


def hidden_paths(config: Config) -> set[str]:
    """The daemon's own secrets (`secret_files`), hidden from every task with a private filesystem.

    The directory of each is hidden whole, both the one it is in and the one its path names (a Kubernetes
    Secret's `token` is a symlink to `..data/token`: hiding the volume's directory covers the next version,
    which is renamed into it); unless code is imported from that directory (a `sys.path` entry or the
    interpreter is inside): then only the file. A path under another one hidden is left out (it is covered).
    """
    code = [os.path.realpath(path) for path in (*sys.path, sys.prefix, sys.base_prefix) if path]
    found: set[str] = set()
    for given in secret_files(config).values():
        file = os.path.realpath(given)
        for directory in {os.path.dirname(file), os.path.realpath(os.path.dirname(given))}:
            holds_code = any(_at_or_under(path, directory) for path in code)
            found.add(file if holds_code or directory == "/" else directory)
    return {path for path in found if not any(path != top and _at_or_under(path, top) for top in found)}


class Secrets:
    """Whether the daemon's secrets are still where the hides of its tasks' sandboxes were mounted.

    A spare sets up its sandbox when it is forked, well before a call: a secret replaced after that by a
    rename (a new token file renamed over the old, a new directory renamed into place, a symlink flipped
    to a new version) is no longer under the tmpfs or /dev/null mounted then, which cover the old one. A
    rename into a hidden directory changes nothing a task sees; a rename of it, or of a hidden file, or a
    secret that resolves to another file, changes the identity (device, inode) of what its path gives: the
    fork server client compares them at each hand-over (`rotated`, a few stats) and ends the spares set up
    before (task_runner.server.forkclient).
    """

    def __init__(self, config: Config, hidden: frozenset[str]) -> None:
        self._config = config
        self.hidden = hidden  # what the generation's profiles hide (hidden_paths when they were built)
        self._paths = tuple(dict.fromkeys([*secret_files(config).values(), *sorted(hidden)]))
        self._seen = self._identities()

    def _identities(self) -> tuple[tuple[int, int] | None, ...]:
        seen: list[tuple[int, int] | None] = []
        for path in self._paths:
            try:
                info = os.stat(path)  # (following symlinks: the file a secret's path gives now)
            except OSError:
                seen.append(None)
            else:
                seen.append((info.st_dev, info.st_ino))
        return tuple(seen)

    def rotated(self) -> bool:
        """A secret or a hidden path is no longer the file or directory it was when last looked at."""
        now = self._identities()
        if now == self._seen:
            return False
        self._seen = now
        return True

    def uncovered(self) -> list[str]:
        """What must be hidden now (hidden_paths, its symlinks resolved afresh) that the profiles' hides do
        not cover: a secret whose real path moved out of every hidden directory."""
        return sorted(path for path in hidden_paths(self._config)
                      if not any(_at_or_under(path, top) for top in self.hidden))


def check(catalogue: Mapping[str, Task], failures: Mapping[str, str]) -> list[str]:
    """What `failures` (part -> why) means for `catalogue`: warnings logged here; refusals returned.

    A part a task's sandbox asks for by name (in the file) that cannot be set up is a refusal;
    a default one is a warning: the tasks run without it.
    """
    refusals: list[str] = []
    for part in PARTS:
        why = failures.get(part)
        if why is None:
            continue
        wanting = [name for name, task in catalogue.items() if task.sandbox.sandboxed(part)]
        asked = [name for name in wanting if part in catalogue[name].sandbox.explicit]
        setting = f'{part} = "{SandboxConfig.CHOICES[part][0]}"'
        if asked:
            refusals.append(f"sandbox: {setting} cannot be set up on this machine ({why}); asked for by "
                            f"{', '.join(asked)}")
        elif wanting:
            log.warning("sandbox: %s cannot be set up on this machine (%s): tasks run without it", setting, why)
    return refusals


def unwritable(config: Config, where: str) -> list[str]:
    """The `writable` paths of `config` that a task would find hidden, so empty and read-only: at or under a
    path hidden from it (the hides are mounted after the writable paths). One line each, naming the key."""
    secrets = secret_files(config)
    daemons = {path: {what: os.path.realpath(file) for what, file in secrets.items()
                      if file and _at_or_under(os.path.realpath(file), path)}
               for path in hidden_paths(config)}
    found: dict[str, None] = {}  # (ordered, and a key's path once: the tasks that share it share the line)
    for name, task in config.catalogue.items():
        if not task.sandbox.sandboxed("filesystem"):
            continue
        own = config.tasks[name].sandbox if name in config.tasks else None
        writable = f"tasks.{name}.sandbox.writable" if own is not None and "writable" in own.explicit \
            else "sandbox.writable"
        own_hide = own.hide if own is not None and "hide" in own.explicit else ()
        # A task's hide adds to [sandbox]'s: each path is one key's.
        hides = {path: f"tasks.{name}.sandbox.hide" if path in own_hide else "sandbox.hide"
                 for path in task.sandbox.hide}
        hidden = {**{path: (f"it holds {', '.join(f'{what} {file}' for what, file in files.items())}: the daemon "
                            "hides the directory of its config, tokens and TLS key from every task",
                            f"move {' and '.join(files)} elsewhere")
                     for path, files in daemons.items()},
                  **{os.path.realpath(path): (f"'{hides[path]}' hides it", f"take it out of '{hides[path]}'")
                     for path in task.sandbox.hide}}
        for path in task.sandbox.writable:
            real = os.path.realpath(path)
            for secret, (why, fix) in hidden.items():
                if _at_or_under(real, secret):
                    under = "is" if real == secret else f"is under {secret}, which is"
                    found[f"{where}: '{writable}': {path} {under} hidden from tasks ({why}), so they would "
                          f"find it empty and read-only: {fix}, or make another path writable"] = None
    return list(found)


def _at_or_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


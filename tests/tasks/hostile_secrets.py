"""Hostile tasks against the daemon's secrets and against its promise of no core dumps."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import subprocess

# A program that asks for the largest core it may leave, then crashes (exec makes a process dumpable again).
# The shell, not the interpreter: as another uid, a task may not be able to exec the daemon's interpreter.
_CRASH = 'ulimit -S -c "$(ulimit -H -c)"; kill -SEGV $$'


def read_paths(options):
    """What this task sees at each of options["paths"]: a directory's listing, a file's first bytes, or why not."""
    seen = {}
    for path in options["paths"]:
        entry = {"exists": os.path.exists(path)}
        try:
            if os.path.isdir(path):
                entry["listing"] = sorted(os.listdir(path))
            elif entry["exists"]:
                with open(path, "rb") as f:
                    entry["content"] = f.read(200).decode(errors="replace")
        except OSError as exc:
            entry["errno"] = exc.errno
        seen[path] = entry
    return True, {"uid": os.getuid(), "seen": seen}


def core_limits(options):
    """RLIMIT_CORE as the task has it, whether it can raise it, and a program it runs that raises its own to
    the hard limit and crashes in each of options["dirs"]: its signal, and the cores found there after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        raised = True
    except (ValueError, OSError):
        raised = False
    crashes = {}
    for directory in options["dirs"]:
        ran = subprocess.run(["/bin/sh", "-c", _CRASH], cwd=directory, capture_output=True)
        crashes[directory] = {"signal": -ran.returncode,
                              "cores": sorted(name for name in os.listdir(directory) if name.startswith("core"))}
    return True, {"limit": [soft, hard], "raised": raised, "crashes": crashes}


def crash_in(options):
    """Crash with SIGSEGV in options["dir"], having asked for the largest core the hard limit allows."""
    os.chdir(options["dir"])
    with contextlib.suppress(ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    ctypes.string_at(0)

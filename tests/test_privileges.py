"""A root task keeps no privilege (issue "A sandbox that holds for any task"): a daemon as root with no run_as_user
(the quick start) runs every task as root, and each attack here worked against such a task before."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_daemon, wait_for_spares, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the case of a root daemon")


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What a root task of the default sandbox saw and could do, and the writable path it was given."""
    shared = Path(tempfile.mkdtemp(prefix="task-runner-writable-", dir="/run"))
    try:
        daemon = start_daemon(tmp_path_factory.mktemp("root"), f'cgroup = "off"\n[sandbox]\nwritable = ["{shared}"]\n'
                              '[tasks.what_root_can_do]\ntarget = "tests.tasks.hostile_root:what_root_can_do"\n')
        try:
            with daemon.client() as client:
                result = client.call("what_root_can_do", 20_000).result
            assert wait_for_spares(daemon)
            host = (os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/self/ns/user"))

            def joined() -> bool:  # a spare still setting up has not made its namespaces, or its init not joined
                result["spares"] = _namespaces_of_spares(daemon.process.pid)
                return bool(result["spares"]) and all(
                    init == own and own[0] != host[0] and own[1] != host[1] for init, own in result["spares"])

            wait_until(joined, 20)  # (the test below says what was seen if they never do)
            result["shared"] = str(shared)
            yield result
        finally:
            assert daemon.stop() == 0, daemon.log_text()
    finally:
        shutil.rmtree(shared)


def _namespaces_of_spares(daemon_pid: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """For each waiting task process of the daemon (pid 2 of a pid namespace), the mount and user namespaces of
    that namespace's init (pid 1) and its own, read from the host."""
    import psutil

    inner: dict[str, dict[str, tuple[str, str]]] = {}  # pid namespace -> {inner pid: (mount, user) namespaces}
    for process in psutil.Process(daemon_pid).children(recursive=True):
        with contextlib.suppress(OSError, psutil.Error, StopIteration):
            status = Path(f"/proc/{process.pid}/status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
            if len(nspid) == 2:
                pid_ns = os.readlink(f"/proc/{process.pid}/ns/pid")
                inner.setdefault(pid_ns, {})[nspid[1]] = (os.readlink(f"/proc/{process.pid}/ns/mnt"),
                                                          os.readlink(f"/proc/{process.pid}/ns/user"))
    return [(found["1"], found["2"]) for found in inner.values() if "1" in found and "2" in found]


def test_a_root_task_has_no_capability_and_cannot_regain_one(seen: dict[str, Any]) -> None:
    assert seen["uid"] == 0
    assert seen["caps"] == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0), seen["caps"]
    assert seen["securebits"] == 0xEF  # noroot, no setuid fixup, no keep-caps, no ambient raise: each locked


def test_a_root_task_cannot_change_the_clock(seen: dict[str, Any]) -> None:
    assert seen["adjtimex"] == errno.EPERM  # with CAP_SYS_TIME: EINVAL (the tick it asks for is out of range)


def test_a_root_task_cannot_write_the_kernels_settings_nor_reach_its_devices(seen: dict[str, Any]) -> None:
    opened = seen["opened"]
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname"):
        assert opened[path] == errno.EROFS, (path, opened)
    assert opened["/proc/sysrq-trigger"] in (errno.EROFS, errno.ENOENT), opened  # (a kernel without sysrq)
    for path in ("/dev/kmsg", "/dev/kmsg (read)", "/dev/userfaultfd", "/dev/mem", "/dev/sda"):
        assert opened[path] == errno.ENOENT, (path, opened)
    assert set(seen["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue",
                                "fd", "stdin", "stdout", "stderr"}, seen["dev"]
    assert {"null", "urandom", "pts", "ptmx", "shm"} <= set(seen["dev"])


def test_no_path_through_the_init_leads_outside_the_sandbox(seen: dict[str, Any]) -> None:
    through = seen["through_init"]
    for entry in ("root", "cwd"):
        assert through[entry] in ("own", os.strerror(errno.EACCES)), through
    for entry in ("environ", "mem"):
        assert through[entry] == os.strerror(errno.EACCES), through
    assert through["fd"] in ([], os.strerror(errno.EACCES)), through  # it holds no descriptor
    # Each waiting task process's init lives in that process's own mount and user namespaces, not the host's.
    host = (os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/self/ns/user"))
    assert seen["spares"] and all(init == own and own[0] != host[0] and own[1] != host[1]
                                  for init, own in seen["spares"]), seen["spares"]


def test_a_root_task_is_root_only_in_a_user_namespace_of_its_own(seen: dict[str, Any]) -> None:
    # Its one uid mapped to itself: every other namespace of its sandbox belongs to the host's user namespace,
    # over which it has nothing, even were it to regain a capability in its own.
    assert seen["uid_map"] == ["0", "0", "1"], seen["uid_map"]
    assert seen["user_ns"] != os.readlink("/proc/self/ns/user")


def test_a_writable_path_is_mounted_nosuid_and_nodev(seen: dict[str, Any]) -> None:
    line = next(line for line in seen["mounts"].splitlines() if line.split()[4] == seen["shared"])
    options = set(line.split()[5].split(","))
    assert {"rw", "nosuid", "nodev"} <= options, line

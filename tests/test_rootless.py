"""A daemon started by an ordinary user gives its tasks the whole sandbox (issue "A sandbox that holds for any
task"): its fork server is root in a user namespace of its own, so filesystem, network, processes and syscalls
are all set up, and everything runs under that user on the host."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, open_directory, start_daemon
from tests.test_sandbox import syscall_numbers

NOBODY = 65534
UNIT = REPO / "systemd" / "task-runner.service"
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the test makes an ordinary user's daemon with setpriv, as root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv"),
]


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder every user may use: the ordinary user's interpreter, its daemon's files, its tasks' writable path."""
    with open_directory("task-runner-rootless-", 0o755, "/tmp") as path:
        yield path


def ordinary_python(world: Path) -> str:
    """An interpreter an ordinary user may run (this one may live under /root, 0700) that finds our packages."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip("needs /usr/bin/python3")
    version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"/usr/bin/python3 is {version}, these packages are built for {sys.version_info[:2]}")
    venv = world / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "outer.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    return str(venv / "bin" / "python")


def _unit_capabilities() -> str:
    """The systemd unit's capability set, as setpriv spells it ("+setuid,+setgid")."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet="))
    return ",".join(f"+{name.removeprefix('CAP_').lower()}" for name in line.split("=", 1)[1].split())


# The three privilege levels a daemon may start with; each gives its tasks the same sandbox.
WAYS = {
    # An ordinary user: the fork server is root in a user namespace of its own ("0 NOBODY 1").
    "an ordinary user": ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
    # The systemd unit's: a user of its own with the unit's capabilities alone (CAP_SETUID, CAP_SETGID), run_as_user
    # and task uids; the daemon is root in a user namespace that maps those uids (task_runner.server.sandbox.users).
    "the unit's capabilities": ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                *(f"--{kind}=-all,{_unit_capabilities()}" for kind in
                                  ("inh-caps", "ambient-caps", "bounding-set"))),
    "root": (),
}


@pytest.mark.parametrize("way", WAYS)
def test_every_privilege_level_gives_its_tasks_every_part_of_the_sandbox(world: Path, way: str) -> None:
    shared = world / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    home = world / "d"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    claims = world / "claims"  # the unit's: a claims directory of its user's own
    claims.mkdir(mode=0o700)
    os.chown(claims, NOBODY, NOBODY)
    per_task_uids = way == "the unit's capabilities"
    # A range of its own: with a claims directory of its own, "auto" would be the first block every root daemon
    # of this machine claims too, and a daemon kills what runs under the uids it claims when it starts.
    owner = 'run_as_user = "daemon"\ntask_uids = "1600000000-1600004095"\n' if per_task_uids else ""
    daemon = start_daemon(
        home, f'cgroup = "off"\n{owner}'
              f'[sandbox]\nfilesystem = "private"\nnetwork = "none"\nprocesses = "private"\n'
              f'syscalls = "default"\nwritable = ["{shared}"]\n'
              '[tasks.rootless_view]\ntarget = "tests.tasks.hostile_root:rootless_view"\n',
        env={"PYTHONPATH": str(REPO), "TASK_RUNNER_UID_CLAIMS": str(claims)},
        python=ordinary_python(world) if WAYS[way] else sys.executable, wrap=WAYS[way])
    try:
        assert "cannot be set up" not in daemon.log_text(), daemon.log_text()
        assert "without a user namespace of their own" not in daemon.log_text(), daemon.log_text()
        assert ("in a user namespace of its own (uid map 0 65534 1, 1 1 1, 1600000000 1600000000 4096)"
                in daemon.log_text()) == per_task_uids
        with daemon.client() as client:
            seen = client.call("rootless_view", 20_000, {"mark": str(shared / "mark"),
                                                        "ptrace": syscall_numbers()["ptrace"]}).result
            sandbox = next(task for task in client.tasks() if task.name == "rootless_view").sandbox
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert (sandbox.filesystem, sandbox.network, sandbox.processes, sandbox.syscalls) == \
        ("private", "none", "private", "default"), sandbox
    # In a user namespace of its own that maps its one uid to itself (in the daemon's namespace, which for an
    # ordinary user maps its root to NOBODY alone, and for the unit's maps run_as_user and the task uids).
    assert seen["uid_map"] == [str(seen["uid"]), str(seen["uid"]), "1"], seen
    writer = (shared / "mark").stat().st_uid
    if per_task_uids:
        assert 1_600_000_000 <= seen["uid"] <= 1_600_004_095 and writer == seen["uid"], (seen, writer)  # a task uid
    else:
        assert seen["uid"] == 0 and writer == (NOBODY if WAYS[way] else 0), (seen, writer)
    assert seen["cap_eff"] == seen["cap_bnd"] == 0, seen
    assert seen["tmp"] == "tmpfs" and seen["interfaces"] == ["lo"], seen
    assert seen["pid"] == 2 and seen["pids"] == [1, 2], seen
    assert seen["ptrace"] == errno.EPERM, seen
    assert "kmsg" not in seen["dev"] and "null" in seen["dev"], seen

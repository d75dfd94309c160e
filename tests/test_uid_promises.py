"""The uid promises, attacked: a uid serves again only once nothing of it is left; set-user-ID plants are inert;
claims never overlap and no task can squat them; a catalogue of any size reaches the fork server.

Each test is an attack that worked against an earlier daemon (issue "Keep every promise, second round").
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, cgroup_v2_writable, in_ci, start_daemon, wait_gone, wait_until

HOSTILE = "tests.tasks.hostile_uids"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="uids of their own need a root daemon")
# These tests try the uid layer alone: a private filesystem and pid namespace would hide what they look for.
# (a table: it goes after every top-level key)
UID_LAYER = '[sandbox]\nfilesystem = "host"\nprocesses = "host"\n'


def tasks(*names: str) -> str:
    return "".join(f'[tasks.{name}]\ntarget = "{HOSTILE}:{name}"\n' for name in names)


def claimed_range(daemon: Daemon) -> tuple[int, int]:
    found = re.search(r"each task runs under a uid of its own, from (\d+)-(\d+)", daemon.log_text())
    assert found, daemon.log_text()
    return int(found.group(1)), int(found.group(2))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every task uid may write to, as /tmp is."""
    path = Path(tempfile.mkdtemp(prefix="task-runner-uids-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


@root_only
@pytest.mark.parametrize("cgroup", ["off", "auto"])
def test_a_uid_serves_again_only_once_nothing_of_it_is_left(tmp_path: Path, cgroup: str) -> None:
    """A task leaves a 250-deep chain, each link in a session of its own, and returns. Every later task of
    its uid (a small range, so uids come round quickly) finds no other process of its uid alive."""
    if cgroup == "auto" and not cgroup_v2_writable():
        if in_ci():
            pytest.fail("no writable cgroup v2 hierarchy")
        pytest.skip("no writable cgroup v2 hierarchy on this machine")
    first = 0x7200_0000 + (os.getpid() % 4096) * 16
    config = (f'run_as_user = "nobody"\ntask_uids = "{first}-{first + 9}"\nmax_running = 2\nspare_processes = 1\n'
              f'cgroup = "{cgroup}"\n' + tasks("leave_chain", "others_of_my_uid") + UID_LAYER)
    daemon = start_daemon(tmp_path / "d", config)
    try:
        with daemon.client() as client:
            left = client.call("leave_chain", 60_000, {"depth": 250}).result
            assert len(left["pids"]) == 250, left
            reports = [client.call("others_of_my_uid", 10_000).result for _ in range(30)]
        assert left["uid"] in {report["uid"] for report in reports}, "the chain's uid never served again"
        for report in reports:
            assert report["pids"] == [] and report["alone"], report
        assert wait_gone([int(pid) for pid in left["pids"]], 10) == []
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@root_only
def test_a_set_user_id_file_a_task_leaves_serves_no_later_task(tmp_path: Path, shared_dir: Path) -> None:
    """no_new_privs: a set-user-ID copy of `id`, owned by one task's uid, runs as the uid of whoever runs it."""
    daemon = start_daemon(tmp_path / "d", 'run_as_user = "nobody"\n' + tasks("plant_setuid", "run_planted") + UID_LAYER)
    try:
        with daemon.client() as client:
            planted = client.call("plant_setuid", 10_000, {"dir": str(shared_dir)}).result
            assert os.stat(planted["path"]).st_mode & 0o4000  # the plant is really set-user-ID
            ran = client.call("run_planted", 10_000, {"path": planted["path"]}).result
        assert ran["no_new_privs"], ran
        assert ran["uid"] != planted["uid"], (ran, planted)
        assert ran["ran_as"] == ran["uid"], f"the plant ran as {ran['ran_as']}, the planter's uid"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@root_only
def test_a_range_inside_another_daemons_block_is_refused_and_harms_nothing(tmp_path: Path, shared_dir: Path) -> None:
    first = start_daemon(tmp_path / "a", 'run_as_user = "nobody"\n' + UID_LAYER)
    pidfile = shared_dir / "victim"
    try:
        low, _ = claimed_range(first)
        with first.client() as client, ThreadPoolExecutor(1) as pool:
            victim = pool.submit(client.call, "victim", 30_000, {"pidfile": str(pidfile), "s": 2})
            assert wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"), 10)
            with pytest.raises(RuntimeError, match="did not start") as refused:
                start_daemon(tmp_path / "b", f'run_as_user = "nobody"\ntask_uids = "{low + 100}-{low + 109}"\n'
                             "max_running = 1\nspare_processes = 1\n")
            message = str(refused.value)
            assert f"overlaps uids {low}-{low + 4095}" in message, message
            assert f"the daemon with pid {first.process.pid}" in message, message
            assert victim.result(30).result == {"undisturbed": True}
    finally:
        assert first.stop() == 0, first.log_text()


@root_only
def test_no_task_can_squat_or_touch_the_uid_claims(tmp_path: Path, shared_dir: Path) -> None:
    """A task binds every name the old claims used and tries the claims directory; a new daemon still starts."""
    first = start_daemon(tmp_path / "a", 'run_as_user = "nobody"\n' + tasks("squat_claims") + UID_LAYER)
    ready = shared_dir / "ready"
    try:
        with first.client() as client, ThreadPoolExecutor(1) as pool:
            squat = pool.submit(client.call, "squat_claims", 60_000,
                                {"claims": "/run/isolated-task-runner/uids", "ready": str(ready), "s": 1})
            assert wait_until(ready.exists, 30)
            second = start_daemon(tmp_path / "b", 'run_as_user = "nobody"\n')
            try:
                assert claimed_range(second) != claimed_range(first)
            finally:
                assert second.stop() == 0, second.log_text()
            report = squat.result(60).result
        assert report["tried"] == {"list": "PermissionError", "create": "PermissionError", "lock": "PermissionError"}
        assert report["bound"] == 4096  # every name the old claims used was there for the taking
    finally:
        assert first.stop() == 0, first.log_text()


def test_a_catalogue_of_thousands_of_tasks_starts(tmp_path: Path) -> None:
    """2,000 tasks with 120-character descriptions: the fork server's first messages no longer fit one packet."""
    module = tmp_path / "many_tasks.py"
    description = "x" * 120
    module.write_text(f'def described(options):\n    """{description}"""\n    return True, {{"ok": 1}}\n')
    config = "".join(f'[tasks.t{n:04d}]\ntarget = "many_tasks:described"\n' for n in range(2000))
    daemon = start_daemon(tmp_path / "d", 'cgroup = "off"\nentry_points = false\n' + config,
                          env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
    try:
        with daemon.client() as client:
            listed = {task.name: task for task in client.tasks()}
            assert len(listed) >= 2000
            assert listed["t1999"].description == description
            assert client.call("t1234", 10_000).result == {"ok": 1}
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@root_only
def test_what_a_task_sees_of_others_in_proc_is_what_the_readme_says(tmp_path: Path) -> None:
    """Without a pid namespace, /proc shows other processes' command lines and status (the README says so, and
    never to put secrets in argv); their environment, memory and descriptors stay closed to a uid of its own."""
    readme = (REPO / "README.md").read_text()
    assert "never pass a secret on the command line" in readme
    daemon = start_daemon(tmp_path / "d", 'run_as_user = "nobody"\n' + tasks("read_others_proc") + UID_LAYER)
    try:
        with daemon.client() as client:
            seen = client.call("read_others_proc", 10_000, {"pid": os.getpid()}).result
        assert seen == {"cmdline": True, "status": True, "environ": False, "mem": False, "fd": False}, seen
    finally:
        assert daemon.stop() == 0, daemon.log_text()

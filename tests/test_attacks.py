"""Promises kept under attack: kills under load, hostile leftovers, a full disk, a dead fork server, big requests.

Each test reproduces a fault found from the outside against an earlier daemon, over real gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from task_runner.client import NO_RETRY, Client, Security, TaskFailed, Unavailable
from task_runner.v1 import task_runner_pb2 as pb
from tests.conftest import (
    REPO,
    Daemon,
    cgroup_v2_writable,
    in_ci,
    read_pids,
    start_daemon,
    wait_gone,
    wait_until,
)
from tests.test_contract import leftovers

PERFORM = "/task_runner.v1.TaskRunner/Perform"
TOKEN = "attack-test-token-0123456789"


def request(task: str, timeout_ms: int, options: dict[str, Any] | None = None, request_id: str = "") -> bytes:
    message = pb.PerformRequest(task=task, timeout_ms=timeout_ms, request_id=request_id)
    message.options.update(options or {})
    return message.SerializeToString()


def gather_calls(target: str, calls: Callable[[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]], list[Awaitable[Any]]],
                 ) -> list[Any]:
    """Run the calls `calls(perform)` makes, all at once, on one channel; their results (or exceptions)."""
    async def run() -> list[Any]:
        async with grpc.aio.insecure_channel(target) as channel:
            perform = channel.unary_unary(PERFORM)
            return await asyncio.gather(*calls(perform), return_exceptions=True)
    return asyncio.run(run())


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon with room for hundreds of tasks at once, and no spares: every call forks."""
    d = start_daemon(tmp_path_factory.mktemp("crowded"), "max_running = 400\nspare_processes = 0\ncgroup = \"off\"\n")
    yield d
    assert d.stop() == 0, d.log_text()


def test_deadlines_hold_during_a_fork_storm(crowded: Daemon, tmp_path: Path) -> None:
    """400 callers, each calling again as soon as answered, with 300 ms deadlines, for 3 s: the fork
    server forks without pause while kills pour in. Every call is killed and answered TIMEOUT."""
    pidfile = tmp_path / "pids"
    payload = request("write_pid_and_sleep", 300, {"pidfile": str(pidfile), "s": 10})

    async def caller(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> list[int | str]:
        kinds: list[int | str] = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                answer = pb.PerformResponse.FromString(await perform(payload, timeout=60))
            except grpc.aio.AioRpcError as exc:
                kinds.append(exc.code().name)
                continue
            # The deadline bound: answered well before the task's own 10 s, however busy the daemon.
            kinds.append(answer.error.kind if time.monotonic() - started < 5 else "late")
        return kinds

    results = gather_calls(crowded.unix, lambda perform: [caller(perform) for _ in range(400)])
    kinds = [kind for result in results for kind in (result if isinstance(result, list) else [repr(result)])]
    assert len(kinds) >= 400 and set(kinds) == {pb.TaskError.TIMEOUT}, {k: kinds.count(k) for k in set(kinds)}
    assert wait_gone(read_pids(pidfile), 20) == []
    assert wait_until(lambda: leftovers(crowded, spares=0) == [], 20), leftovers(crowded, spares=0)


def test_cancels_hold_during_a_fork_storm(crowded: Daemon, tmp_path: Path) -> None:
    """400 calls cancelled by their callers while they start: every task process is killed."""
    pidfile = tmp_path / "pids"

    async def cancelled(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> str:
        call = perform(request("write_pid_and_sleep", 60_000, {"pidfile": str(pidfile), "s": 60}), timeout=60)
        await asyncio.sleep(1.0)
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return "cancelled"
        return "answered"

    answers = gather_calls(crowded.unix, lambda perform: [cancelled(perform) for _ in range(400)])
    assert answers.count("cancelled") >= 390, answers  # a few may have been answered before the cancel
    assert wait_until(lambda: len(read_pids(pidfile)) > 0, 10)
    assert wait_gone(read_pids(pidfile), 20) == [], "tasks kept running after their calls were cancelled"
    assert wait_until(lambda: leftovers(crowded, spares=0) == [], 20), leftovers(crowded, spares=0)


def test_a_notify_socket_nobody_reads_does_not_freeze_the_daemon(tmp_path: Path) -> None:
    """The watchdog writes every 2 ms to a notify socket read only until READY=1: its queue fills at once."""
    daemon = start_daemon(tmp_path, env={"WATCHDOG_USEC": "4000"})
    try:
        with Client(daemon.unix, retry=NO_RETRY) as client:
            end = time.monotonic() + 1
            while time.monotonic() < end:
                assert client.call("echo", 5000, rpc_timeout=5).outcome
    finally:
        assert daemon.stop() == 0


def test_a_burst_of_cancels_in_the_queue_loses_nothing(tmp_path: Path) -> None:
    """Callers leave the queue while slots are handed over: no call is lost to an error in the queue."""
    daemon = start_daemon(tmp_path, "max_running = 2\n")
    try:
        async def short(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], i: int) -> str:
            try:
                await perform(request("sleep", 5000, {"ms": 1}), timeout=0.02 + (i % 50) / 100)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        answers = gather_calls(daemon.unix, lambda perform: [short(perform, i) for i in range(3000)])
        assert set(answers) <= {"OK", "DEADLINE_EXCEEDED"}, answers
        with Client(daemon.unix) as client:
            assert client.call("echo", 5000).outcome
    finally:
        assert daemon.stop() == 0
    assert "failed to run it" not in daemon.log_text(), daemon.log_text()


HOST_FILESYSTEM = '[sandbox]\nfilesystem = "host"\n'


def victim(tmp_path: Path) -> Path:
    """A directory outside the daemon's reach that links planted by tasks point to: it must survive."""
    keep = tmp_path / "victim" / "123"  # named like a dead daemon's directory
    keep.mkdir(parents=True)
    (keep / "precious").write_text("keep me")
    return keep.parent


def test_a_deep_hostile_tree_is_removed_without_following_links(tmp_path: Path) -> None:
    # The daemon's working directories are what is attacked: the tasks' filesystem is the host's.
    daemon = start_daemon(tmp_path / "d", f'workdir_base = "{tmp_path / "work"}"\n{HOST_FILESYSTEM}')
    try:
        with Client(daemon.unix) as client:
            answer = client.call("leave_a_mess", 30_000, {"depth": 3000, "victim": str(victim(tmp_path))})
            assert wait_until(lambda: not Path(answer.result["cwd"]).exists(), 20), "the tree was left behind"
            assert (tmp_path / "victim" / "123" / "precious").read_text() == "keep me"
            assert client.call("echo", 5000).outcome
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_a_killed_daemons_deep_leftovers_do_not_stop_the_next_start(tmp_path: Path) -> None:
    config = f'workdir_base = "{tmp_path / "work"}"\n'
    pidfile = tmp_path / "pids"
    first = start_daemon(tmp_path / "first", config)
    with Client(first.unix) as client, ThreadPoolExecutor(1) as pool:
        pool.submit(client.call, "leave_a_mess", 60_000,
                    {"depth": 3000, "victim": str(victim(tmp_path)), "hang": True, "pidfile": str(pidfile)})
        assert wait_until(lambda: read_pids(pidfile), 30)
        first.process.kill()
        first.stop()
    assert (tmp_path / "work" / str(first.process.pid)).is_dir()
    second = start_daemon(tmp_path / "second", config)
    try:
        assert not (tmp_path / "work" / str(first.process.pid)).exists()
        assert (tmp_path / "victim" / "123" / "precious").read_text() == "keep me"
    finally:
        assert second.stop() == 0, second.log_text()


def test_a_workdir_base_planted_as_a_symlink_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    (tmp_path / "base").symlink_to(target)
    with pytest.raises(RuntimeError, match="is a symbolic link: set workdir_base to a real directory"):
        start_daemon(tmp_path / "d", f'workdir_base = "{tmp_path / "base"}"\n')
    assert (target / "123" / "precious").read_text() == "keep me"


@contextlib.contextmanager
def small_filesystem(path: Path, inodes: int) -> Iterator[Path]:
    """A tmpfs with few inodes, mounted for the test (root only)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=8m,nr_inodes={inodes}", "none",
                                            str(path)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_is_answered_at_once_and_service_resumes(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", inodes=400) as small:
        daemon = start_daemon(tmp_path / "d", f'workdir_base = "{small / "work"}"\nspare_processes = 2\n'
                              f'{HOST_FILESYSTEM}')
        try:
            with Client(daemon.unix, retry=NO_RETRY) as client:
                assert client.call("echo", 5000).outcome
                fds = psutil.Process(daemon.process.pid).num_fds()
                filler = small / "filler"
                filler.mkdir()
                full = threading.Event()
                stop = threading.Event()

                def fill() -> None:  # takes every inode there is, and each one the daemon frees
                    for i in itertools.count():
                        while not stop.is_set():
                            try:
                                (filler / str(i)).touch()
                                break
                            except OSError:
                                full.set()
                                time.sleep(0.0002)
                        if stop.is_set():
                            return

                thread = threading.Thread(target=fill)
                thread.start()
                try:
                    assert full.wait(10)
                    refused = 0
                    for _ in range(10):  # the spares made before the disk filled serve first
                        started = time.monotonic()
                        try:
                            client.call("echo", 30_000)
                        except Unavailable as exc:
                            assert "working directory: No space left on device" in str(exc), exc
                            assert time.monotonic() - started < 5  # at once, not at the 30 s deadline
                            refused += 1
                finally:
                    stop.set()
                    thread.join()
                assert refused >= 5
                assert psutil.Process(daemon.process.pid).num_fds() <= fds + 2  # nothing leaked
                shutil.rmtree(filler)

                def serves() -> bool:
                    try:
                        return client.call("echo", 5000).outcome
                    except Unavailable:
                        return False

                assert wait_until(serves, 10), "service did not resume once space was back"
        finally:
            assert daemon.stop() == 0, daemon.log_text()


def test_a_tasks_temporary_directory_is_its_own(client: Client) -> None:
    answer = client.call("temporary_file", 5000).result
    assert answer["tmpdir"] == answer["cwd"] and answer["file"].startswith(answer["cwd"] + "/")


def forkserver_of(daemon: Daemon) -> psutil.Process:
    return next(p for p in psutil.Process(daemon.process.pid).children() if "forkserver" in " ".join(p.cmdline()))


def serves(client: Client) -> bool:
    try:
        return client.call("echo", 5000).outcome
    except Unavailable:
        return False


@pytest.mark.parametrize("mode", ["off", "auto"], ids=["process-groups", "cgroup-v2"])
def test_a_dead_fork_server_leaves_nothing_and_its_successor_has_cgroups(tmp_path: Path, mode: str) -> None:
    if mode == "auto" and not cgroup_v2_writable():
        if in_ci():
            pytest.fail("CI's machines have a writable cgroup v2 hierarchy: both paths must be tested there")
        pytest.skip("no writable cgroup v2 hierarchy on this machine")
    daemon = start_daemon(tmp_path / "d", f'cgroup = "{mode}"\n')
    pidfile = tmp_path / "pids"
    try:
        with Client(daemon.unix, retry=NO_RETRY) as client, ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.call, "stubborn_tree", 60_000, {"pidfile": str(pidfile)})
            assert wait_until(lambda: len(read_pids(pidfile)) == 4, 20), read_pids(pidfile)
            forkserver_of(daemon).kill()
            with pytest.raises(TaskFailed, match="SIGKILL"):
                running.result(30)
            assert wait_gone(read_pids(pidfile), 10) == [], "processes of the dead fork server's tasks survived"
            assert wait_until(lambda: serves(client), 20)
            if mode == "auto":
                cgroup = client.call("my_cgroup", 5000).result["cgroup"]
                assert re.search(r"/task-runner-\d+/g2/s\d+$", cgroup), cgroup
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def reloadable(tmp_path: Path, directory: Path, config: str = "") -> tuple[Daemon, Path]:
    """A daemon serving `version` from a module in tmp_path that the test rewrites; the module's path."""
    package = tmp_path / "reloadable"
    package.mkdir()
    module = package / "version_task.py"
    write_version(module, 1)
    daemon = start_daemon(directory, config + '[tasks.version]\ntarget = "version_task:version"\n',
                          env={"PYTHONPATH": f"{REPO}:{package}"})
    return daemon, module


def write_version(module: Path, version: int, prelude: str = "") -> None:
    # A size of its own each time, so that a .pyc written in the same second is not taken for current.
    module.write_text(f"{prelude}import time\n# {'#' * version}\ndef version(options):\n"
                      f"    time.sleep(options.get('s', 0))\n    return True, {{'version': {version}}}\n")


def test_sigterm_while_a_reload_hangs_at_import_exits_within_the_grace(tmp_path: Path) -> None:
    daemon, module = reloadable(tmp_path, tmp_path / "d", "drain_grace_s = 1\n")
    try:
        write_version(module, 2, prelude="import time\ntime.sleep(600)\n")  # the new code hangs at import
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for("RELOADING=1"), daemon.notifications
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(20) == 0
        assert time.monotonic() - started < 1 + 10  # the grace and a small bound
    finally:
        daemon.stop()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(module.parent) in " ".join(p.info["cmdline"] or [])]


def test_every_sighup_takes_effect_and_no_call_is_refused_for_a_reload(tmp_path: Path) -> None:
    daemon, module = reloadable(tmp_path, tmp_path / "d", "spare_processes = 0\nmax_running = 64\n")
    try:
        with Client(daemon.unix, retry=NO_RETRY) as client, ThreadPoolExecutor(64) as pool:
            slow = pool.submit(client.call, "version", 30_000, {"s": 4})  # holds the first fork server
            write_version(module, 2)
            daemon.process.send_signal(signal.SIGHUP)
            assert daemon.wait_for("STATUS=reloaded"), daemon.notifications
            # The first fork server still waits for its slow task; these SIGHUPs come during that.
            calls = [pool.submit(client.call, "version", 30_000) for _ in range(60)]  # waiting for forks
            write_version(module, 3)
            daemon.process.send_signal(signal.SIGHUP)
            daemon.process.send_signal(signal.SIGHUP)
            assert daemon.wait_for("STATUS=reloaded"), daemon.notifications
            assert {call.result(30).result["version"] for call in calls} <= {2, 3}  # none refused
            assert wait_until(lambda: client.call("version", 5000).result == {"version": 3}, 10)
            assert slow.result(30).result == {"version": 1}
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def big_options(mib: float) -> dict[str, Any]:
    """Options of about `mib` MiB made of many small values: the costliest kind to parse and walk."""
    return {"pad": [1.5] * int(mib * (1 << 20) / 11)}


def test_waiting_calls_hold_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    """50 calls of 3 MiB while the only slot is busy: two wait (8 MiB allowed), the rest are refused at
    once, and the daemon holds each waiting one once (an earlier daemon held ~11 MiB for each)."""
    daemon = start_daemon(tmp_path / "d", "max_running = 1\nmax_queued_bytes = 8388608\n")
    pidfile = tmp_path / "pids"
    try:
        rss = psutil.Process(daemon.process.pid).memory_info().rss
        big = request("sleep", 10_000, {"ms": 1, **big_options(3)})
        blocker = request("write_pid_and_sleep", 3000, {"pidfile": str(pidfile), "s": 60})
        grown: list[int] = []

        async def calls(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> list[str]:
            holding = asyncio.ensure_future(perform(blocker, timeout=30))  # the one slot, for 3 s
            while not read_pids(pidfile):
                await asyncio.sleep(0.01)

            async def one() -> str:
                try:
                    await perform(big, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    assert "max_queued_bytes" in (exc.details() or ""), exc
                    return exc.code().name
                return "OK"

            waiting: list[asyncio.Future[str]] = []
            for _ in range(10):  # in waves, so that what gRPC buffers in transit stays small
                wave = [asyncio.ensure_future(one()) for _ in range(5)]
                waiting += wave
                while sum(call.done() for call in waiting) < len(waiting) - 2 and not holding.done():
                    await asyncio.sleep(0.01)
            grown.append(psutil.Process(daemon.process.pid).memory_info().rss - rss)
            await holding
            return list(await asyncio.gather(*waiting))

        answers = gather_calls(daemon.unix, lambda perform: [calls(perform)])[0]
        assert answers.count("RESOURCE_EXHAUSTED") == 48 and answers.count("OK") == 2, answers
        # Generous: parsing the two admitted requests leaves freed memory that malloc keeps; an earlier
        # daemon, queueing all 50, grew by over 500 MiB.
        assert grown[0] < 250 << 20, f"the daemon grew by {grown[0] >> 20} MiB while calls waited"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_big_requests_do_not_delay_other_calls_deadlines(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", "max_running = 16\n")
    try:
        big = request("sleep", 10_000, {"ms": 1, **big_options(3.8)})
        timed = request("sleep", 300, {"ms": 10_000})

        async def calls(perform: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> tuple[float, list[Any]]:
            bigs = [asyncio.ensure_future(perform(big, timeout=60)) for _ in range(8)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            answer = pb.PerformResponse.FromString(await perform(timed, timeout=30))
            assert answer.error.kind == pb.TaskError.TIMEOUT
            return time.monotonic() - started, await asyncio.gather(*bigs, return_exceptions=True)

        elapsed, bigs = gather_calls(daemon.unix, lambda perform: [calls(perform)])[0]
        assert all(isinstance(b, bytes) and pb.PerformResponse.FromString(b).outcome for b in bigs), bigs
        assert elapsed < 0.3 + 0.7, f"a 300 ms deadline was answered after {elapsed:.2f} s"  # generous
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="running tasks as other users needs root")
def test_tasks_cannot_reach_each_other_or_the_spares(tmp_path: Path) -> None:
    """With run_as_user alone (no sandbox: uids are what is tested), a task can neither write, signal, trace
    nor read another task or a spare."""
    shared = Path(tempfile.mkdtemp(prefix="task-runner-attack-"))  # reachable by the tasks' users
    shared.chmod(0o1777)
    pidfile = shared / "victim"
    daemon = start_daemon(tmp_path / "d", 'run_as_user = "nobody"\nspare_processes = 3\n'
                          '[sandbox]\nfilesystem = "host"\nprocesses = "host"\n')
    try:
        with Client(daemon.unix) as client, ThreadPoolExecutor(1) as pool:
            victim = pool.submit(client.call, "victim", 30_000, {"pidfile": str(pidfile), "s": 3})
            assert wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"), 10)
            pid, cwd = pidfile.read_text().split()
            report = client.call("reach_others", 30_000, {"victim": int(pid), "victim_cwd": cwd}).result
            assert all(report["control"].values()), report["control"]  # the probes work: on itself
            assert report["targets"] >= 2, report  # the victim and the spares
            assert report["reached"] == [], report["reached"]
            assert victim.result(30).result == {"undisturbed": True}
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        shutil.rmtree(shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="running tasks as other users needs root")
def test_a_task_cannot_call_its_own_daemon(tmp_path: Path) -> None:
    """The token it never sees keeps it off TCP; the unix socket's mode keeps its uid out."""
    (tmp_path / "token").write_text(TOKEN)
    daemon = start_daemon(tmp_path / "d", f'run_as_user = "nobody"\n[auth]\ntoken_file = "{tmp_path / "token"}"\n'
                          '[tasks.call_own_daemon]\ntarget = "tests.tasks.caller:call_own_daemon"\n')
    try:
        with Client(daemon.unix, Security(token=TOKEN)) as client:
            ended = client.call("call_own_daemon", 30_000, {"targets": [daemon.unix, daemon.tcp]}).result
        assert ended[daemon.tcp].startswith("UNAUTHENTICATED"), ended
        assert ended[daemon.unix].startswith("UNAVAILABLE") and "Permission denied" in ended[daemon.unix], ended
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_the_oom_killer_picks_a_task_before_its_daemon(client: Client) -> None:
    """A task that eats the memory of its container or unit is the one the kernel kills, with all it started."""
    assert client.call("oom_scores", 10_000).result == {"own": "1000", "child": "1000"}


@pytest.mark.skipif(os.geteuid() != 0, reason="uids of their own need root")
def test_a_fork_bomb_stops_at_the_default_processes_limit(tmp_path: Path) -> None:
    """No [limits] processes in the file: a task under a uid of its own still gets no more than 256."""
    daemon = start_daemon(tmp_path / "d", 'run_as_user = "nobody"\ncgroup = "off"\n')
    try:
        with daemon.client() as client:
            got = client.call("fork_and_count", 60_000, {"most": 400}).result
        assert got["refused"] == "EAGAIN" and 200 < got["forked"] < 256, got
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the case of a root daemon")
def test_a_root_daemon_says_when_nothing_bounds_its_root_tasks_processes(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", 'cgroup = "off"\n')
    try:
        assert "[limits] processes (256) is not enforced" in daemon.log_text(), daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_a_daemon_whose_tasks_run_as_itself_says_they_can_call_it(tmp_path: Path) -> None:
    """No token and no run_as_user (the quick start): its tasks reach its TCP port (and would open its unix socket,
    were it not under the /tmp a private filesystem replaces)."""
    daemon = start_daemon(tmp_path / "d", '[tasks.call_own_daemon]\ntarget = "tests.tasks.caller:call_own_daemon"\n')
    try:
        with daemon.client() as client:
            ended = client.call("call_own_daemon", 30_000, {"targets": [daemon.tcp]}).result
        assert ended == {daemon.tcp: "OK"}, ended
        said = next(line for line in daemon.log_text().splitlines() if "tasks can call this daemon" in line)
        assert daemon.unix in said and "127.0.0.1:0" in said and "run_as_user" in said, said
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="running tasks as other users needs root")
def test_a_daemon_open_to_its_tasks_says_so(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d", 'run_as_user = "nobody"\n')
    try:
        assert "tasks can call this daemon on 127.0.0.1:0" in daemon.log_text(), daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()

"""What a task can reach and who may call: limits, working directories, secrets, token, TLS, exposure."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from task_runner.client import Client, Finished, Security, TaskFailed, Unauthenticated, Unavailable
from tests.conftest import REPO, Daemon, start_daemon, wait_until
from tests.test_contract import leftovers

TOKEN = "s3cret-token-0123456789abcdef"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("limited"), (
        "default_timeout_ms = 300\nmax_request_bytes = 1048576\n"
        "[limits]\nmemory_mb = 400\ncpu_s = 1\nfile_size_mb = 1\nopen_files = 64\n"
    ))
    yield d
    assert d.stop() == 0


def limit_error(client: Client, task: str, options: dict[str, object], timeout_ms: int = 20_000) -> TaskFailed:
    with pytest.raises(TaskFailed) as caught:
        client.call(task, timeout_ms, options)
    assert caught.value.kind == "LIMIT_EXCEEDED", caught.value
    return caught.value


def test_memory_limit(limited: Daemon) -> None:
    with limited.client() as client:
        error = limit_error(client, "allocate", {"mb": 1000})
        assert "memory limit" in error.message and error.type == "MemoryError"
        assert client.call("allocate", 10_000, {"mb": 10}).outcome  # within the limit


def test_cpu_time_limit(limited: Daemon) -> None:
    with limited.client() as client:
        error = limit_error(client, "spin", {})
        assert "cpu_time limit" in error.message and error.signal == signal.SIGXCPU


def test_file_size_limit(limited: Daemon) -> None:
    with limited.client() as client:
        error = limit_error(client, "write_file", {"mb": 5})
        assert "file_size limit" in error.message


def test_open_files_limit(limited: Daemon) -> None:
    with limited.client() as client:
        error = limit_error(client, "open_many", {"n": 1000})
        assert "open_files limit" in error.message


def test_fresh_working_directory_removed_afterwards(limited: Daemon) -> None:
    with limited.client() as client:
        first = client.call("whoami", 5000).result
        written = client.call("write_cwd", 5000).result  # leaves a file behind
        second = client.call("whoami", 5000).result
        assert first["cwd"] != second["cwd"]
        assert first["entries"] == [] and first["mode"] == "0o700"
        assert wait_until(lambda: not Path(first["cwd"]).exists(), 5)
        assert wait_until(lambda: not Path(written["cwd"]).exists(), 5)
        assert client.call("delete_cwd", 5000).outcome  # a task may even delete its own
        assert client.call("echo", 5000).outcome


def test_default_timeout_applies_when_the_request_gives_none(limited: Daemon) -> None:
    from task_runner.client import TaskTimeout

    with limited.client() as client, pytest.raises(TaskTimeout, match="within 300 ms"):
        client.call("sleep", 0, {"ms": 2000})


def test_request_size_limit(limited: Daemon) -> None:
    from task_runner.client import NO_RETRY, Overloaded

    with Client(limited.unix, retry=NO_RETRY) as client:
        assert client.call("echo", 5000, {"blob": "x" * (512 << 10)}).outcome  # under the 1 MiB limit
        with pytest.raises(Overloaded):
            client.call("echo", 5000, {"blob": "x" * (2 << 20)})


def test_per_task_limits_override_the_global_ones(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, (
        '[limits]\nmemory_mb = 2000\n[tasks.small]\ntarget = "tests.tasks.faults:allocate"\n'
        "[tasks.small.limits]\nmemory_mb = 200\n"
    ))
    try:
        with daemon.client() as client:
            assert limit_error(client, "small", {"mb": 500}).limit == "memory"
            assert client.call("allocate", 20_000, {"mb": 500}).outcome  # under the global limit
    finally:
        assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root")
def test_tasks_run_as_the_configured_user(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, 'run_as_user = "nobody"\n')
    try:
        with daemon.client() as client:
            seen = [client.call("whoami", 5000).result for _ in range(3)]
            for me in seen:  # nobody's group and no other, and a uid of its own from the unnamed block
                assert me["uid"] >= 0x7000_0000 and (me["gid"], me["groups"]) == (65534, []), me
                assert me["entries"] == [] and me["mode"] == "0o700"  # its own directory, writable by it alone
            assert len({me["uid"] for me in seen}) == 3
            forkserver = next(p for p in psutil.Process(daemon.process.pid).children()
                              if "forkserver" in " ".join(p.cmdline()))
            assert forkserver.uids().real == 0  # a task cannot signal or trace its parent
    finally:
        assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root")
def test_task_uids_off_runs_every_task_as_run_as_user(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, 'run_as_user = "nobody"\ntask_uids = "off"\n')
    try:
        with daemon.client() as client:
            assert client.call("whoami", 5000).result["uid"] == 65534
        assert "tasks can signal each other" in daemon.log_text()  # said loudly, at start
    finally:
        assert daemon.stop() == 0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, certificates: dict[str, Path]) -> Iterator[Daemon]:
    d = tmp_path_factory.mktemp("secured")
    (d / "token").write_text(TOKEN + "\n")
    metrics_port = free_port()
    daemon = start_daemon(d, (
        f'unix_socket_mode = "0600"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
        f'[auth]\ntoken_file = "{d / "token"}"\n'
        f'[tls]\ncert_file = "{certificates["server.pem"]}"\nkey_file = "{certificates["server.key"]}"\n'
        f'client_ca_file = "{certificates["ca.pem"]}"\n'
    ))
    daemon.metrics_port = metrics_port  # type: ignore[attr-defined]
    yield daemon
    assert daemon.stop() == 0


def mtls(certificates: dict[str, Path], token: str | None = TOKEN) -> Security:
    return Security(root_certs_file=str(certificates["ca.pem"]), cert_file=str(certificates["client.pem"]),
                    key_file=str(certificates["client.key"]), token=token)


def test_token_required(secured: Daemon) -> None:
    with Client(secured.unix) as client, pytest.raises(Unauthenticated):
        client.call("echo", 5000)
    with Client(secured.unix, Security(token="wrong-token-0123456789")) as client, pytest.raises(Unauthenticated):
        client.call("echo", 5000)
    with Client(secured.unix, Security(token=TOKEN)) as client:
        assert client.call("echo", 5000).outcome


def test_streams_watch_and_cancel_need_the_token_too(secured: Daemon) -> None:
    with Client(secured.unix, Security(token=TOKEN)) as client:
        assert client.call("echo", 5000, request_id="tok-1").outcome
    with Client(secured.unix) as client:
        with pytest.raises(Unauthenticated):
            list(client.stream("echo", 5000))
        with pytest.raises(Unauthenticated):
            list(client.watch("tok-1"))
        with pytest.raises(Unauthenticated):
            client.cancel("tok-1")
    with Client(secured.unix, Security(token=TOKEN)) as client:
        assert isinstance(list(client.watch("tok-1"))[-1], Finished)


def test_token_from_the_environment(secured: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASK_RUNNER_TOKEN", TOKEN)
    with Client(secured.unix) as client:
        assert client.call("echo", 5000).outcome


def test_health_needs_no_token(secured: Daemon) -> None:
    with grpc.insecure_channel(secured.unix) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls(secured: Daemon, certificates: dict[str, Path]) -> None:
    with Client(secured.tcp, mtls(certificates)) as client:
        assert client.call("echo", 5000, {"over": "tls"}).result == {"options": {"over": "tls"}}
    no_client_cert = Security(root_certs_file=str(certificates["ca.pem"]), token=TOKEN)
    with Client(secured.tcp, no_client_cert) as client, pytest.raises(Unavailable):
        client.call("echo", 5000, rpc_timeout=5)
    with Client(secured.tcp, Security(token=TOKEN)) as client, pytest.raises(Unavailable):  # plaintext to TLS
        client.call("echo", 5000, rpc_timeout=5)


def test_unix_socket_mode(secured: Daemon) -> None:
    mode = os.stat(secured.unix.removeprefix("unix:")).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another user needs root")
def test_unix_socket_owner_and_group(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, 'unix_socket_user = "nobody"\nunix_socket_group = "nogroup"\n')
    try:
        info = os.stat(daemon.unix.removeprefix("unix:"))
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o660)
    finally:
        assert daemon.stop() == 0


def secret(name: str, value: str, path: Path | None = None) -> dict[str, object]:
    return {"name": name, "prefix": value[:6], "length": len(value.encode()),
            "sha256": hashlib.sha256(value.encode()).hexdigest(), "path": str(path) if path else ""}


def test_tasks_cannot_find_the_daemons_secrets(secured: Daemon, certificates: dict[str, Path]) -> None:
    key = certificates["server.key"].read_text()
    key_body = key.split("-----\n", 1)[1][:64]  # a piece of the private key's base64 body
    secrets = [secret("token", TOKEN, secured.log.parent / "token"), secret("tls key", key_body,
               certificates["server.key"]), secret("notify socket", str(secured.log.parent / "notify"))]
    planted = "planted-" + "x" * 20
    with Client(secured.unix, Security(token=TOKEN)) as client:
        # The search is sound: it finds a value that is in the task's memory (its own options) and
        # an open descriptor (its stdin), and nothing that is not there.
        control = client.call("find_secrets", 30_000, {"plant": planted, "secrets": [
            secret("planted", planted), secret("stdin", "/dev/null-not-a-value", Path("/dev/null")),
            secret("absent", "absent-" + "y" * 20)]}).result
        found = client.call("find_secrets", 30_000, {"secrets": secrets}).result
    assert control["found"] == ["planted in memory", "stdin as an open descriptor"], control["found"]
    assert found["scanned_bytes"] > 1 << 20  # it did read its memory
    assert found["found"] == [], found["found"]
    assert len(found["fds"]) <= 5, found["fds"]


def test_search_finds_what_is_there(client: Client) -> None:
    """The secret search does find a secret that really is in the task's environment."""
    answer = client.call("find_secrets", 30_000, {"secrets": [secret("test secret", "hunter2")]})
    assert answer.result["found"] == []  # the shared daemon filters TASK_RUNNER_TEST_SECRET out
    planted = secret("path", "PATH=" + os.environ["PATH"][:20])
    assert "path in environment" in client.call("find_secrets", 30_000, {"secrets": [planted]}).result["found"]


def test_metrics(secured: Daemon) -> None:
    with Client(secured.unix, Security(token=TOKEN)) as client:
        client.call("echo", 5000)
        with pytest.raises(TaskFailed):
            client.call("raise_now", 5000)
    with Client(secured.unix) as client, pytest.raises(Unauthenticated):
        client.call("echo", 5000)
    port = secured.metrics_port  # type: ignore[attr-defined]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'task_runner_tasks_finished_total{caller="default",error_kind="",outcome="true",task="echo"}' in text
    assert 'task_runner_tasks_finished_total{caller="default",error_kind="EXCEPTION",outcome="",task="raise_now"}' \
        in text
    assert "task_runner_queue_wait_seconds_bucket" in text and "task_runner_tasks_running" in text


def test_refuses_to_expose_itself_without_tls_or_token(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "task_runner.server", "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without TLS or a token" in done.stderr


def test_sighup_reloads_task_code_and_registrations(tmp_path: Path) -> None:
    package = tmp_path / "reloadable"
    package.mkdir()
    module = package / "version_task.py"
    module.write_text(
        "import time\n"
        "def version(options):\n    return True, {'version': 1}\n"
        "def version_slow(options):\n    open(options['marker'], 'w').close()\n    time.sleep(1.5)\n"
        "    return True, {'version': 1}\n"
    )
    marker = tmp_path / "started"
    directory = tmp_path / "d"
    daemon = start_daemon(
        directory, '[tasks.version]\ntarget = "version_task:version"\n'
        '[tasks.version_slow]\ntarget = "version_task:version_slow"\n',
        env={"PYTHONPATH": f"{REPO}:{package}"},
    )
    try:
        with daemon.client() as client, ThreadPoolExecutor(1) as pool:
            assert client.call("version", 5000).result == {"version": 1}
            in_flight = pool.submit(client.call, "version_slow", 10_000, {"marker": str(marker)})
            assert wait_until(marker.exists, 10)  # running on the old fork server across the reload
            # Another size than before, so that a .pyc written in the same second is not taken for current.
            module.write_text("def version(options):\n    return True, {'version': 20}\n")
            config = directory / "config.toml"
            config.write_text(config.read_text() + '[tasks.added]\ntarget = "version_task:version"\n')
            daemon.process.send_signal(signal.SIGHUP)
            assert daemon.wait_for("STATUS=reloaded", 15), daemon.log_text()
            assert client.call("version", 5000).result == {"version": 20}
            assert client.call("added", 5000).result == {"version": 20}
            assert in_flight.result(timeout=30).result == {"version": 1}  # untouched by the reload
    finally:
        assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root")
def test_process_limit(tmp_path: Path) -> None:
    """RLIMIT_NPROC binds only an unprivileged user: tasks run as nobody here, and fork until refused."""
    daemon = start_daemon(tmp_path, 'run_as_user = "nobody"\ncgroup = "off"\n[limits]\nprocesses = 24\n')
    try:
        with daemon.client() as client:
            error = limit_error(client, "fork_until_refused", {})
            assert error.limit == "processes" and error.type == "BlockingIOError"
            assert limit_error(client, "threads_until_refused", {}).limit == "processes"  # threads count too
            assert wait_until(lambda: leftovers(daemon) == [], 10), leftovers(daemon)  # its children went too
            assert client.call("whoami", 5000).outcome
    finally:
        assert daemon.stop() == 0

"""Named callers over real gRPC: who may run what, whose calls are whose, each caller's share of the queue,
and the caller's name wherever a call is seen (issue "Who may do what")."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from task_runner.client import (
    AsyncClient,
    Client,
    Overloaded,
    PermissionDenied,
    Security,
    TaskCancelled,
    TaskNotFound,
    Unauthenticated,
)
from task_runner.client.events import Finished, Started
from task_runner.client.retry import NO_RETRY
from tests.conftest import REPO, start_daemon, wait_until, write_config
from tests.inprocess import InProcessDaemon, with_harness_writable
from tests.test_admission import Gate, gate, wait_queued  # noqa: F401  (gate: a fixture)

TOKENS = {name: f"{name}-token-0123456789abcdef" for name in ("reports", "billing", "ops", "audit")}
REPORTS_TASKS = ["echo", "log_start", "who_calls"]


def caller_tables(directory: Path, callers: dict[str, str]) -> str:
    """[callers.NAME] tables, each with a token file of its own and the given extra lines."""
    tables = []
    for name, lines in callers.items():
        token = directory / f"{name}.token"
        token.write_text(TOKENS[name] + "\n")
        tables.append(f'[callers.{name}]\ntoken_file = "{token}"\n{lines}')
    return "\n".join(tables)


STANDARD = {
    "reports": f"tasks = {REPORTS_TASKS}\n".replace("'", '"'),
    "billing": 'tasks = ["echo", "log_start", "who_calls"]\nmax_running = 1\nmax_queued = 3\n',
    "ops": 'tasks = ["*"]\nsee_all = true\n',
}


def config_text(directory: Path, settings: str, callers: dict[str, str]) -> str:
    text = write_config(directory / "tasks.toml", f'cgroup = "off"\n{settings}').read_text()
    return text + "\n" + caller_tables(directory, callers)


def callers_daemon(tmp_path: Path, settings: str = "", callers: dict[str, str] | None = None) -> InProcessDaemon:
    directory = tmp_path / "d"
    directory.mkdir(parents=True, exist_ok=True)
    return InProcessDaemon(directory, config_text(directory, settings, STANDARD if callers is None else callers))


def as_(d: InProcessDaemon, name: str) -> Client:
    return Client(d.unix, Security(token=TOKENS[name]), retry=NO_RETRY)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessDaemon]:
    with callers_daemon(tmp_path_factory.mktemp("callers"), "max_running = 4\n") as d:
        yield d


def test_each_caller_runs_only_its_tasks(shared: InProcessDaemon) -> None:
    with as_(shared, "reports") as reports, as_(shared, "ops") as ops:
        assert reports.call("echo", 5000, {"a": 1}).result == {"options": {"a": 1}}
        with pytest.raises(PermissionDenied) as denied:
            reports.call("whoami", 5000)
        assert denied.value.reason == "TASK_NOT_PERMITTED"
        assert denied.value.metadata == {"caller": "reports", "task": "whoami"}
        assert "callers.reports.tasks" in denied.value.message  # what to change
        assert sorted(task.name for task in reports.tasks()) == sorted(REPORTS_TASKS)
        with pytest.raises(TaskNotFound) as unknown:  # an unknown task's message lists its tasks alone
            reports.call("no_such_task", 5000)
        assert "whoami" not in unknown.value.message and "echo" in unknown.value.message
        assert ops.call("whoami", 5000).outcome  # "*": every task
        assert "whoami" in {task.name for task in ops.tasks()}


def test_a_call_that_names_no_caller_is_unauthenticated(shared: InProcessDaemon) -> None:
    for security in (None, Security(token="not-a-callers-token-0123456789")):
        with Client(shared.unix, security, retry=NO_RETRY) as nobody:
            for attempt in (lambda c: c.call("echo", 5000), lambda c: c.tasks(), lambda c: c.cancel("x"),
                            lambda c: list(c.watch("x"))):
                with pytest.raises(Unauthenticated):
                    attempt(nobody)
    with grpc.insecure_channel(shared.unix) as channel:  # health needs no caller
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_request_id_is_its_callers_own(shared: InProcessDaemon, gate: Gate) -> None:  # noqa: F811
    with as_(shared, "reports") as reports, as_(shared, "billing") as billing, as_(shared, "ops") as ops, \
            ThreadPoolExecutor(2) as pool:
        running = pool.submit(reports.call, "log_start", 30_000, gate.options("r", wait=True), request_id="job-42")
        assert wait_until(lambda: gate.started() == ["r"], 10)

        def refusals(client: Client, request_id: str) -> tuple[str, str]:
            with pytest.raises(TaskNotFound) as watched:
                list(client.watch(request_id))
            with pytest.raises(TaskNotFound) as cancelled:
                client.cancel(request_id)
            return (watched.value.message.replace(request_id, "ID"), cancelled.value.message.replace(request_id, "ID"))

        # Another caller's id is not found, exactly as an id nobody used: no oracle of which ids exist.
        assert refusals(billing, "job-42") == refusals(billing, "job-nobody-used")
        # An operator sees it: its Watch follows reports' call, and its Cancel could stop it.
        follow = pool.submit(lambda: list(ops.watch("job-42")))
        gate.open()
        assert running.result(timeout=30).outcome
        assert isinstance(follow.result(timeout=30)[-1], Finished)
        # Its answer is kept for reports' repeat, and never given to billing's call under the same id.
        assert reports.call("log_start", 30_000, gate.options("r", wait=True), request_id="job-42").outcome
        mine = billing.call("who_calls", 5000, request_id="job-42")
        assert mine.result == {"caller": "billing", "request_id": "job-42"}
        assert gate.started() == ["r"]  # reports' repeat was answered from the cache, never ran again
        assert refusals(billing, "job-nobody-used") == refusals(reports, "job-nobody-used")
        assert isinstance(list(billing.watch("job-42"))[-1], Finished)  # billing's own, now
        assert list(ops.watch("job-42"))  # ops sees one of them


def test_an_operator_may_cancel_another_callers_call(shared: InProcessDaemon, gate: Gate) -> None:  # noqa: F811
    with as_(shared, "reports") as reports, as_(shared, "billing") as billing, as_(shared, "ops") as ops, \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(reports.call, "log_start", 30_000, gate.options("c", wait=True), request_id="job-43")
        assert wait_until(lambda: gate.started() == ["c"], 10)
        with pytest.raises(TaskNotFound):
            billing.cancel("job-43")
        assert ops.cancel("job-43") is True
        with pytest.raises(TaskCancelled):
            running.result(timeout=30)


def test_another_callers_many_fairness_keys_do_not_delay_a_caller(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    callers = {"reports": STANDARD["reports"], "billing": 'tasks = ["log_start"]\n'}
    with callers_daemon(tmp_path, "max_running = 1\nmax_queued = 500\n", callers) as d:
        async def scenario() -> None:
            async with AsyncClient(d.unix, Security(token=TOKENS["reports"])) as reports, \
                    AsyncClient(d.unix, Security(token=TOKENS["billing"])) as billing:
                blocker = asyncio.ensure_future(reports.call("log_start", 30_000, gate.options("block", wait=True)))
                await asyncio.to_thread(lambda: wait_until(lambda: gate.started() == ["block"], 10))
                calls = [asyncio.ensure_future(reports.call("log_start", 30_000, gate.options("R"),
                                                            fairness_key=f"key-{i}")) for i in range(200)]
                await asyncio.to_thread(wait_queued, d, 200)
                calls += [asyncio.ensure_future(billing.call("log_start", 30_000, gate.options("B"),
                                                             fairness_key="key-0")) for _ in range(2)]
                await asyncio.to_thread(wait_queued, d, 202)
                gate.open()
                assert all(answer.outcome for answer in await asyncio.gather(blocker, *calls))
        asyncio.run(scenario())
    started = gate.started()
    assert len(started) == 203
    assert started[1:5] == ["R", "B", "R", "B"], started[:8]  # billing's turn at every other start


def test_a_callers_limits_bind_it_alone(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    with callers_daemon(tmp_path, "max_running = 4\n") as d, as_(d, "billing") as billing, \
            as_(d, "reports") as reports, ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(billing.call, "log_start", 30_000, gate.options(f"b{i}", wait=True)) for i in range(4)]
        wait_queued(d, 3)  # max_running = 1: one runs, three wait although slots are free
        assert wait_until(lambda: len(gate.started()) == 1, 10)
        with pytest.raises(Overloaded) as full:
            billing.call("log_start", 30_000, gate.options("b-refused"))
        assert full.value.reason == "QUEUE_FULL"
        assert full.value.quota == ("callers.billing.max_queued",)
        assert full.value.retry_delay_s is not None and full.value.retry_delay_s > 0
        assert "callers.billing.max_queued = 3" in full.value.message
        # Its limits are its own: reports runs in a free slot at once, and may wait beyond billing's three.
        calls.append(pool.submit(reports.call, "log_start", 30_000, gate.options("r", wait=True)))
        assert wait_until(lambda: "r" in gate.started(), 10)
        registry = d.daemon.metrics.registry
        assert registry.get_sample_value("task_runner_admission_rejected_total",
                                         {"limit": "callers.billing.max_queued"}) == 1
        gate.open()
        assert all(call.result(timeout=30).outcome for call in calls)
    events = gate.events()
    running = peak = 0
    for label, what, _ in events:
        if label.startswith("b"):
            running += 1 if what == "start" else -1
            peak = max(peak, running)
    assert peak == 1, events  # billing never had two running
    assert "b-refused" not in gate.started()


def test_the_callers_name_is_in_the_event_the_task_the_metrics_and_the_log(
        shared: InProcessDaemon, caplog: pytest.LogCaptureFixture) -> None:
    registry = shared.daemon.metrics.registry
    before = registry.get_sample_value("task_runner_tasks_started_total", {"task": "who_calls", "caller": "reports"})
    with caplog.at_level(logging.INFO), as_(shared, "reports") as reports:
        events = list(reports.stream("who_calls", 5000, request_id="who-1"))
        with pytest.raises(PermissionDenied):
            reports.call("whoami", 5000)
    started = next(event for event in events if isinstance(event, Started))
    assert started.caller == "reports"
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.result.result == {"caller": "reports", "request_id": "who-1"}  # task_runner.task.caller()
    assert registry.get_sample_value("task_runner_tasks_started_total",
                                     {"task": "who_calls", "caller": "reports"}) == (before or 0) + 1
    assert registry.get_sample_value("task_runner_tasks_finished_total", {
        "task": "who_calls", "outcome": "true", "error_kind": "", "caller": "reports"}) >= 1
    assert registry.get_sample_value("task_runner_requests_rejected_total",
                                     {"status": "PERMISSION_DENIED", "caller": "reports"}) >= 1
    lines = [record for record in caplog.records if getattr(record, "request_id", "") == "who-1"]
    assert lines and all(getattr(record, "caller", "") == "reports" for record in lines)
    assert TOKENS["reports"] not in caplog.text  # the name, never the token


def test_a_reload_adds_removes_and_changes_callers(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    with callers_daemon(tmp_path, "max_running = 4\n") as d, as_(d, "billing") as billing, \
            as_(d, "audit") as audit, as_(d, "reports") as reports, ThreadPoolExecutor(1) as pool:
        with pytest.raises(Unauthenticated):
            audit.call("echo", 5000)
        running = pool.submit(billing.call, "log_start", 30_000, gate.options("b", wait=True))
        assert wait_until(lambda: gate.started() == ["b"], 10)
        directory = tmp_path / "d"
        changed = {"reports": 'tasks = ["echo"]\n', "ops": STANDARD["ops"], "audit": 'tasks = ["who_calls"]\n'}
        text = config_text(directory, "max_running = 4\n", changed)
        (directory / "config.toml").write_text(with_harness_writable(text, directory))
        after = len(d.notifier.states)
        d.request_reload()
        assert d.notifier.wait_for("STATUS=reloaded", 20, after), d.notifier.states
        assert audit.call("who_calls", 5000).result["caller"] == "audit"  # new: may call at once
        with pytest.raises(Unauthenticated):  # removed: its new calls are refused ...
            billing.call("echo", 5000)
        with pytest.raises(PermissionDenied):  # changed: its rights apply to new calls
            reports.call("who_calls", 5000)
        gate.open()
        assert running.result(timeout=30).outcome  # ... and its running call finished


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "task_runner.server.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_check_config_validates_the_callers(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    broken = 'broken_import = "tests.tasks.broken_import:never"'  # it would be reported: it does not import
    good.write_text(config_text(tmp_path, "", STANDARD).replace(broken, ""))
    ok = check_config(good)
    assert ok.returncode == 0 and "callers: reports, billing, ops" in ok.stdout, ok.stdout + ok.stderr
    (tmp_path / "billing.token").write_text(TOKENS["reports"])  # the same token as reports'
    refused = check_config(good)
    assert refused.returncode == 2 and "callers reports and billing have the same token" in refused.stderr
    cases = {
        '[callers.x]\ntasks = ["echo"]\n': "needs token_file, token_env or tls_identity",
        f'[callers.x]\ntoken_file = "{tmp_path}/ops.token"\ntasks = ["nope"]\n': "no task named nope",
        '[callers."a b"]\ntoken_env = "X"\ntasks = ["echo"]\n': "a caller's name is",
        '[callers.x]\ntls_identity = "CN=x"\ntasks = ["echo"]\n': "needs client certificates",
    }
    for table, message in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(write_config(tmp_path / "t.toml").read_text() + table)
        refused = check_config(bad)
        assert refused.returncode == 2 and message in refused.stderr, (table, refused.stderr)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and client certificates: one with a SPIFFE URI SAN, one
    with a common name alone, and one the config names no caller for."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-ca")
    names = {"server": "subjectAltName=IP:127.0.0.1\n", "reports": "subjectAltName=URI:spiffe://test/reports\n",
             "billing": "basicConstraints=CA:FALSE\n", "stranger": "subjectAltName=URI:spiffe://test/stranger\n"}
    for name, extensions in names.items():
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(extensions)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {path.name: path for path in d.iterdir()}


def test_callers_by_their_client_certificates(tmp_path: Path, pki: dict[str, Path]) -> None:
    daemon = start_daemon(tmp_path, (
        'cgroup = "off"\n'
        f'[tls]\ncert_file = "{pki["server.pem"]}"\nkey_file = "{pki["server.key"]}"\n'
        f'client_ca_file = "{pki["ca.pem"]}"\n'
        '[callers.reports]\ntls_identity = "spiffe://test/reports"\ntasks = ["who_calls", "log_start"]\n'
        '[callers.billing]\ntls_identity = "CN=billing"\ntasks = ["who_calls", "echo"]\n'
    ))

    def client(name: str) -> Client:
        return Client(daemon.tcp, Security(root_certs_file=str(pki["ca.pem"]), cert_file=str(pki[f"{name}.pem"]),
                                           key_file=str(pki[f"{name}.key"])), retry=NO_RETRY)

    try:
        with client("reports") as reports, client("billing") as billing, client("stranger") as stranger:
            assert reports.call("who_calls", 5000, request_id="cert-1").result["caller"] == "reports"
            assert billing.call("who_calls", 5000).result["caller"] == "billing"
            with pytest.raises(PermissionDenied):
                reports.call("echo", 5000)
            with pytest.raises(PermissionDenied):
                billing.call("log_start", 5000)
            with pytest.raises(TaskNotFound):  # reports' finished call is not billing's to watch
                list(billing.watch("cert-1"))
            assert isinstance(list(reports.watch("cert-1"))[-1], Finished)
            with pytest.raises(Unauthenticated):  # signed by the CA, but no caller of this config
                stranger.call("who_calls", 5000)
        with Client(daemon.unix, retry=NO_RETRY) as plain, pytest.raises(Unauthenticated):  # no certificate
            plain.call("who_calls", 5000)
    finally:
        assert daemon.stop() == 0


def test_a_callers_rate_holds_its_starts_to_its_bucket(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    callers = {"reports": STANDARD["reports"], "billing": 'tasks = ["log_start"]\nrate_per_s = 10\nburst = 2\n'}
    with callers_daemon(tmp_path, "max_running = 8\n", callers) as d, as_(d, "billing") as billing, \
            ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(billing.call, "log_start", 30_000, gate.options("b")) for _ in range(8)]
        assert all(call.result(timeout=60).outcome for call in calls)
    starts = [at for label, what, at in gate.events() if what == "start" and label == "b"]
    assert len(starts) == 8
    assert starts[-1] - starts[0] >= (8 - 2) / 10 - 0.1  # held to 10 a second after its burst of 2

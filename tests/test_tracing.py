"""Traces that cross into the task: the caller's W3C trace context reaches the task, and where OpenTelemetry
records, the daemon's queue and run spans join the caller's trace (issue "An operator's daemon")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from task_runner.client import TaskException
from task_runner.v1 import task_runner_pb2 as pb
from task_runner.v1.task_runner_pb2_grpc import TaskRunnerStub
from task_runner.values import from_struct
from tests.conftest import Daemon, write_config
from tests.inprocess import InProcessDaemon

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def perform(target: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    with grpc.insecure_channel(target) as channel:
        response = TaskRunnerStub(channel).Perform(pb.PerformRequest(task="trace_of", timeout_ms=5000),
                                                   metadata=metadata, timeout=30)
    assert response.outcome, response
    result: dict[str, Any] = from_struct(response.result)
    return result


def test_the_callers_context_reaches_the_task_as_it_came(daemon: Daemon) -> None:
    """No OpenTelemetry SDK in the daemon: the task continues the caller's own span."""
    got = perform(daemon.unix, (("traceparent", PARENT), ("tracestate", "vendor=opaque")))
    assert got["env"] == PARENT and got["env_state"] == "vendor=opaque"
    assert got["context"] == {"traceparent": PARENT, "tracestate": "vendor=opaque"}
    untraced = perform(daemon.unix, ())
    assert untraced == {"env": None, "env_state": None, "context": {}}  # nothing left of the previous call
    for malformed in ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", "garbage", f"00-{TRACE_ID}-00f067aa0ba902b7"):
        assert perform(daemon.unix, (("traceparent", malformed),))["context"] == {}


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def traced_daemon(tmp_path: Path, spans: InMemorySpanExporter) -> Iterator[InProcessDaemon]:
    text = write_config(tmp_path / "tasks.toml", 'cgroup = "off"\n').read_text()
    with InProcessDaemon(tmp_path / "d", text) as d:
        yield d


def test_the_daemons_spans_join_the_callers_trace_and_the_task_continues_them(
        traced_daemon: InProcessDaemon, spans: InMemorySpanExporter) -> None:
    assert traced_daemon.daemon.executor.tracer.recording
    tracer = trace.get_tracer("test")
    with traced_daemon.client() as client, tracer.start_as_current_span("caller") as caller:
        got = client.call("trace_of", 5000).result  # the client sends the current context itself
    caller_context = caller.get_span_context()
    finished = {span.name: span for span in spans.get_finished_spans()}
    queue, run = finished["task_runner.queue trace_of"], finished["task_runner.run trace_of"]
    for span in (queue, run):
        assert span.parent is not None and span.parent.span_id == caller_context.span_id
        assert span.context.trace_id == caller_context.trace_id
    assert queue.end_time <= run.start_time
    assert run.attributes["task_runner.outcome"] is True and run.attributes["task_runner.task"] == "trace_of"
    # The task's context is the run span's: a span it makes is a child of the daemon's run.
    assert got["env"] == got["context"]["traceparent"]
    version, trace_id, parent_id, flags = got["env"].split("-")
    assert (version, trace_id, parent_id) == ("00", f"{caller_context.trace_id:032x}", f"{run.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_a_failed_run_span_says_how_it_failed(traced_daemon: InProcessDaemon, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    with traced_daemon.client() as client, tracer.start_as_current_span("caller"), pytest.raises(TaskException):
        client.call("raise_now", 5000)
    run = next(span for span in spans.get_finished_spans() if span.name == "task_runner.run raise_now")
    assert run.attributes["task_runner.error_kind"] == "EXCEPTION"
    assert run.status.status_code == trace.StatusCode.ERROR

"""Tracing: a caller's W3C trace context continued through the daemon and into the task.

A call may carry `traceparent` and `tracestate` in its gRPC metadata (W3C Trace Context, as
OpenTelemetry's propagators write them). The daemon hands a context to the task process, as
`TRACEPARENT` / `TRACESTATE` in its environment (the OpenTelemetry convention for environment
carriers) and as `task_runner.task.trace_context()`, so that a task instrumented with OpenTelemetry
makes child spans of the caller's trace:

- Where OpenTelemetry records (a tracer provider of its SDK is set: by the program embedding the
  daemon, or, at `task-runner serve`, from the standard `OTEL_*` variables when
  `OTEL_TRACES_EXPORTER` or an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set), the daemon records two spans
  per traced call, children of the caller's span: `task_runner.queue` (the wait for a slot) and
  `task_runner.run` (from the hand-over to the answer, with the outcome or error kind); the task's
  context is the run span's.
- Otherwise the task gets the caller's context as it came (once its form is checked).

A call without a `traceparent` costs nothing more; the daemon imports OpenTelemetry only where it was
asked to record, and the fork server never does.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
MAX_TRACESTATE = 512  # W3C: at most 32 members; more than this is cut, not refused


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context: the `traceparent` header and its `tracestate` ("" for none)."""

    traceparent: str
    tracestate: str = ""

    @classmethod
    def of(cls, metadata: Any) -> TraceContext | None:
        """The context a call's metadata carries, if it carries a well-formed one."""
        parent = state = ""
        for key, value in metadata or ():
            if key == "traceparent":
                parent = value if isinstance(value, str) else value.decode(errors="replace")
            elif key == "tracestate":
                state = value if isinstance(value, str) else value.decode(errors="replace")
        if not parent or not TRACEPARENT.fullmatch(parent.strip().lower()):
            return None
        return cls(parent.strip().lower(), state.strip()[:MAX_TRACESTATE])


class Tracer:
    """The daemon's spans, where OpenTelemetry records; else nothing (`recording` False)."""

    def __init__(self) -> None:
        self._tracer: Any = None
        self._propagator: Any = None
        self._context: Any = None
        self._trace: Any = None

    @property
    def recording(self) -> bool:
        return self._tracer is not None

    def start(self, own_process: bool) -> None:
        """Record if a tracer provider is set (at `serve`: set one up from the OTEL_* variables first)."""
        if own_process and _asked_by_environment():
            _configure_sdk()
        if "opentelemetry.trace" not in sys.modules:
            return  # nobody set a provider: OpenTelemetry is not even imported
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return
        self._tracer = provider.get_tracer("task_runner.server")
        self._propagator, self._context, self._trace = TraceContextTextMapPropagator(), context, trace
        log.info("tracing: recording spans of traced calls with %s", type(provider).__name__)

    def begin(self, parent: TraceContext, task: str, request_id: str, caller: str, received_at: float,
              ) -> CallSpans | None:
        """The spans of one traced call, its queue span open since `received_at` (loop time)."""
        if self._tracer is None:
            return None
        carrier = {"traceparent": parent.traceparent, "tracestate": parent.tracestate}
        remote = self._propagator.extract(carrier)
        attributes = {"rpc.system": "grpc", "rpc.service": "task_runner.v1.TaskRunner", "task_runner.task": task,
                      "task_runner.request_id": request_id, "task_runner.caller": caller}
        queue = self._tracer.start_span(f"task_runner.queue {task}", context=remote, attributes=attributes,
                                        start_time=_epoch_ns(received_at))
        return CallSpans(self, remote, queue, attributes)

    def context_of(self, span: Any) -> TraceContext:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return TraceContext(carrier.get("traceparent", ""), carrier.get("tracestate", ""))


class CallSpans:
    """The queue span, then the run span, of one call; `end` ends whatever is open."""

    def __init__(self, tracer: Tracer, remote: Any, queue: Any, attributes: dict[str, str]) -> None:
        self._tracer, self._remote, self._attributes = tracer, remote, attributes
        self._queue: Any = queue
        self._run: Any = None

    def admitted(self) -> None:
        if self._queue is not None:
            self._queue.end()
            self._queue = None

    def run(self, task: str) -> TraceContext:
        """Open the run span; the context the task gets (the run span's)."""
        self.admitted()
        tracer = self._tracer._tracer
        self._run = tracer.start_span(f"task_runner.run {task}", context=self._remote, attributes=self._attributes)
        return self._tracer.context_of(self._run)

    def end(self, outcome: str, error: str) -> None:
        self.admitted()
        if self._run is None:
            return
        if outcome:
            self._run.set_attribute("task_runner.outcome", outcome == "true")
        if error:
            from opentelemetry.trace import Status, StatusCode

            self._run.set_attribute("task_runner.error_kind", error)
            self._run.set_status(Status(StatusCode.ERROR, error))
        self._run.end()
        self._run = None


def _epoch_ns(loop_time: float) -> int:
    import asyncio

    return time.time_ns() - int((asyncio.get_running_loop().time() - loop_time) * 1e9)


def _asked_by_environment() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter.strip().lower() == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(exporter or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _configure_sdk() -> None:
    """A tracer provider from the OTEL_* variables (the `tracing` extra; an OTLP exporter package for otlp)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        log.warning("tracing: OTEL_* asks for traces but the OpenTelemetry SDK is not installed "
                    "(pip install 'isolated-task-runner[tracing]'): %s", exc)
        return
    if not os.environ.get("OTEL_SERVICE_NAME"):
        os.environ["OTEL_SERVICE_NAME"] = "task-runner"
    provider = TracerProvider(resource=Resource.create())
    for name in [part.strip().lower() for part in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]:
        exporter: Any
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("tracing: OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-grpc")
                continue
            exporter = OTLPSpanExporter()
        else:
            log.warning("tracing: unknown OTEL_TRACES_EXPORTER %r (console and otlp are known)", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

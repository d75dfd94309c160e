"""Prometheus metrics of the daemon, served over HTTP when `metrics_listen` is set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from task_runner.server.admission import Admission

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The daemon's counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # `caller`: a configured caller's name ("default" where none is; "" for a call that named none).
        self.started = Counter("task_runner_tasks_started", "Tasks handed to their process, by task and caller",
                               ("task", "caller"), registry=r)
        self.finished = Counter("task_runner_tasks_finished", "Tasks finished, by task, outcome, error kind and "
                                "caller", ("task", "outcome", "error_kind", "caller"), registry=r)
        self.rejected = Counter("task_runner_requests_rejected", "Requests refused before running, by gRPC status "
                                "and caller", ("status", "caller"), registry=r)
        self.admission_rejected = Counter(
            "task_runner_admission_rejected", "Calls refused or ended by an admission limit, by the limit "
            "(max_queued, max_queued_bytes, tasks.NAME.max_queued, callers.NAME.max_queued, queue_timeout_ms)",
            ("limit",), registry=r,
        )
        self.events_dropped = Counter(
            "task_runner_events_dropped", "PerformEvents a PerformStream or Watch did not get (it fell behind)",
            registry=r,
        )
        self.tmp_full = Counter(
            "task_runner_tmp_full", "Tasks whose private /tmp (the sandbox's tmp_mb) was full when they answered",
            ("task",), registry=r,
        )
        self.queue_wait = Histogram("task_runner_queue_wait_seconds", "Time waiting for a slot", registry=r,
                                    buckets=_BUCKETS)
        self.start = Histogram("task_runner_start_seconds", "Time obtaining a ready task process", registry=r,
                               buckets=_BUCKETS)
        self.run = Histogram("task_runner_run_seconds", "Time from handing over a task to its answer", ("task",),
                             registry=r, buckets=_BUCKETS)
        self.running = Gauge("task_runner_tasks_running", "Tasks holding a slot", registry=r)
        self.queued = Gauge("task_runner_tasks_queued", "Calls waiting for a slot", registry=r)

    def watch(self, admission: Admission) -> None:
        """Report what `admission` runs and queues: in all, per task and per priority (read at each scrape)."""
        self.running.set_function(lambda: admission.running)
        self.queued.set_function(lambda: admission.queued)
        self.registry.register(_AdmissionCollector(admission))

    def serve(self, address: str) -> None:
        """Serve /metrics on host:port (a daemon thread of prometheus_client's)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        # Read from the scrape's thread: a dict being changed by the loop meanwhile is copied first.
        admission = self._admission
        running = GaugeMetricFamily("task_runner_task_running", "Calls of a task holding a slot", labels=("task",))
        queued = GaugeMetricFamily("task_runner_task_queued", "Calls of a task waiting for a slot", labels=("task",))
        for task, count in list(admission.running_by_task().items()):
            running.add_metric((task,), count)
        for task, count in list(admission.queued_by_task().items()):
            queued.add_metric((task,), count)
        by_priority = GaugeMetricFamily("task_runner_priority_queued", "Calls waiting for a slot, by priority",
                                        labels=("priority",))
        for priority, count in sorted(admission.queued_by_priority().items()):
            by_priority.add_metric((str(priority),), count)
        yield from (running, queued, by_priority)

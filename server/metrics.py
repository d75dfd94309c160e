"""Prometheus metrics of the daemon, served over HTTP when `metrics_listen` is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The daemon's counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter("task_runner_tasks_finished", "Tasks finished, by task, outcome and error kind",
                                ("task", "outcome", "error_kind"), registry=r)
        self.rejected = Counter("task_runner_requests_rejected", "Requests refused before running, by gRPC status",
                                ("status",), registry=r)
        self.queue_wait = Histogram("task_runner_queue_wait_seconds", "Time waiting for a slot", registry=r,
                                    buckets=_BUCKETS)
        self.start = Histogram("task_runner_start_seconds", "Time obtaining a ready task process", registry=r,
                               buckets=_BUCKETS)
        self.run = Histogram("task_runner_run_seconds", "Time from handing over a task to its answer", ("task",),
                             registry=r, buckets=_BUCKETS)
        self.running = Gauge("task_runner_tasks_running", "Tasks holding a slot", registry=r)
        self.queued = Gauge("task_runner_tasks_queued", "Calls waiting for a slot", registry=r)

    def serve(self, address: str) -> None:
        """Serve /metrics on host:port (a daemon thread of prometheus_client's)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)

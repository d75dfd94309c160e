"""Prometheus metrics of the daemon, served over HTTP when `metrics_listen` is set (with a bearer token if given)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from task_runner.server.callers import read_token

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from prometheus_client.metrics_core import Metric

    from task_runner.server.admission import Admission
    from task_runner.server.config import Config

log = logging.getLogger("task_runner.server")
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
        self._server: WSGIServer | None = None

    def watch(self, admission: Admission) -> None:
        """Report what `admission` runs and queues: in all, per task and per priority (read at each scrape)."""
        self.running.set_function(lambda: admission.running)
        self.queued.set_function(lambda: admission.queued)
        self.registry.register(_AdmissionCollector(admission))

    def listen(self, config: Config) -> str:
        """Serve /metrics on `config`'s metrics_listen, behind metrics_token_file's token if set (read once,
        here: a new token needs a restart); the address bound.

        Raises:
            CredentialsError: the token file cannot be read, or its token is too short.
            OSError: the address cannot be bound.
        """
        assert config.metrics_listen is not None
        token = read_token(config.metrics_token_file, None, "metrics_token_file")
        bound = self.serve(config.metrics_listen, token)
        log.info("metrics on http://%s/metrics%s", bound, " (bearer token: metrics_token_file)" if token else "")
        return bound

    def serve(self, address: str, token: bytes | None = None) -> str:
        """Serve /metrics on host:port from a thread of its own; with `token`, only to scrapes that send
        `Authorization: Bearer TOKEN`. Returns the address bound (its port, where `address` asked for 0).

        Raises:
            OSError: the address cannot be bound.
        """
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        server = make_server(host, int(port), _guarded(make_wsgi_app(self.registry), token),
                             _IPv6Server if ":" in host else _Server, handler_class=_QuietHandler)
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return f"[{host}]:{server.server_port}" if ":" in host else f"{host}:{server.server_port}"

    def close(self) -> None:
        """Stop serving /metrics (its thread notices within half a second) and close the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def readable_by_tasks(config: Config) -> list[str]:
    """The tasks that can read /metrics: where no token guards it, those whose network is the host's."""
    if config.metrics_listen is None or config.metrics_token_file is not None:
        return []
    return [name for name, task in config.catalogue.items() if not task.sandbox.sandboxed("network")]


def _guarded(app: WSGIApplication, token: bytes | None) -> WSGIApplication:
    """`app` behind a bearer token (compared in constant time, its length included), or `app` itself."""
    if token is None:
        return app
    expected = hashlib.sha256(token).digest()

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # WSGI gives a header as latin-1 text (PEP 3333): encoded back, it is the bytes that came.
        scheme, _, presented = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode("latin-1")).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Bearer realm="metrics"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"missing or wrong bearer token: send Authorization: Bearer <metrics_token_file's token>\n"]

    return guarded


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the daemon's exit


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # (its signature)
        """Scrapes are not logged: every 15 s, they would drown the daemon's own lines."""


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

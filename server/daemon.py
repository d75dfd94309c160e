"""The daemon's lifecycle: fork server first, then gRPC; serve; on SIGTERM drain, then stop.

    start() -> serve until a signal -> drain() -> stop()

Signals only set events. The first SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new
calls get UNAVAILABLE, running tasks may finish within the drain grace, the rest are killed and
answered CANCELLED. A second one cuts the grace short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio re-exports
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from task_runner.server.config import Config
from task_runner.server.notify import Notifier
from task_runner.server.service import SERVICE_NAME, TaskRunnerService
from task_runner.server.supervisor import ForkServerClient, Stop

log = logging.getLogger("task_runner.server")


class ListenError(RuntimeError):
    """An address the daemon cannot listen on."""


class Daemon:
    """One running daemon. Build with a Config, then `await start()`, `await serve()`."""

    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.addresses: list[str] = []
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._forkserver: ForkServerClient | None = None
        self._service: TaskRunnerService | None = None
        self._health = health_aio.HealthServicer()

    async def start(self) -> None:
        """Start the fork server, then gRPC, and bind every listen address."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # before READY=1: a stop may come at once
            loop.add_signal_handler(signum, self.request_stop)
        tasks = {name: task.target for name, task in self.config.all_tasks().items()}
        # The fork server must exist before any gRPC thread does: it forks, and it must hold
        # nothing of ours. It is spawned as a fresh interpreter, so it is clean either way.
        self._forkserver = ForkServerClient(self.config, tasks)
        await self._forkserver.start()
        self._service = TaskRunnerService(self.config, self._forkserver)
        message_cap = self.config.result_max_bytes + 2 * self.config.output_tail_bytes + (1 << 20)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_request_bytes),
            ("grpc.max_send_message_length", message_cap),
            ("grpc.so_reuseport", 0),
        ])
        self._server = server
        server.add_generic_rpc_handlers((self._service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
        )
        for address in self.config.listen:
            self.addresses.append(self._bind(server, address))
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        for name, info in self._forkserver.info.items():
            if info.import_error:
                log.warning("task %s failed to import; each call will answer its error:\n%s", name, info.import_error)
        log.info("listening on %s; serving tasks: %s", ", ".join(self.addresses), ", ".join(self._service.task_names()))
        self.notifier.notify("READY=1", f"STATUS=listening on {' '.join(self.addresses)}")

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str) -> str:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address}: {exc}") from exc
        if address.startswith("unix:"):
            return address
        if port == 0:
            raise ListenError(f"cannot listen on {address}: the address is in use or not available")
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def request_stop(self) -> None:
        """A signal arrived: drain on the first, force on the second."""
        if self._stop_requested.is_set():
            log.warning("second stop signal: killing running tasks now")
            self._force.set()
        else:
            log.info("stop signal: draining (grace %.0f s); send it again to force", self.config.drain_grace_s)
            self._stop_requested.set()

    async def serve(self) -> None:
        """Serve until a stop is requested, then drain and stop."""
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._stop_requested.wait()
            await self.drain()
        finally:
            watchdog.cancel()
            await self.stop()

    async def drain(self) -> None:
        assert self._service is not None
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        self._service.draining = True
        await self._health.enter_graceful_shutdown()
        idle = asyncio.ensure_future(self._service.slots.wait_idle())
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait((idle, force), timeout=self.config.drain_grace_s, return_when=asyncio.FIRST_COMPLETED)
        if not idle.done():
            log.warning("drain grace over: cancelling %d running tasks", self._service.slots.running)
            self._service.stop_all(Stop.CANCELLED)
            await idle
        force.cancel()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)  # lets the last answers go out
        if self._forkserver is not None:
            await self._forkserver.close()
        self.notifier.close()
        log.info("stopped")

    async def _watchdog(self) -> None:
        usec = int(os.environ.pop("WATCHDOG_USEC", "0") or 0)
        if not usec or not self.notifier.enabled:
            return
        while True:  # the event loop's own liveness is what the watchdog checks
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)


async def run(config: Config) -> int:
    """Run a daemon until it is told to stop; the process's exit code."""
    daemon = Daemon(config)
    try:
        await daemon.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await daemon.stop()
        raise
    await daemon.serve()
    return 0


__all__ = ["Daemon", "ListenError", "run"]


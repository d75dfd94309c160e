"""A bare gRPC unary service on Perform's method path: the transport floor Perform is compared with.

    python -m bench.echo_server --listen 127.0.0.1:0 --listen unix:/tmp/echo.sock

It answers every call at once with an empty PerformResponse, without parsing the request, and
announces readiness the way the daemon does: READY=1 and "STATUS=listening on ADDR ..." to the
datagram socket named by $NOTIFY_SOCKET. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import Any

import grpc
import grpc.aio

from task_runner.v1.task_runner_pb2 import DESCRIPTOR, PerformResponse

SERVICE_NAME = DESCRIPTOR.services_by_name["TaskRunner"].full_name
EMPTY_RESPONSE: bytes = PerformResponse().SerializeToString()


def notify(*states: str) -> None:
    """Send states to $NOTIFY_SOCKET, if it is set (sd_notify(3))."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(states).encode(), address)


async def perform(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return EMPTY_RESPONSE


async def serve(listen: list[str]) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Perform": grpc.unary_unary_rpc_method_handler(perform)},
    )
    server.add_generic_rpc_handlers((handler,))
    addresses = []
    for address in listen:
        port = server.add_insecure_port(address)
        addresses.append(address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notify("READY=1", f"STATUS=listening on {' '.join(addresses)}")
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", required=True, help="host:port or unix:/path")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()

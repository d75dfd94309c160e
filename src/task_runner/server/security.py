"""Who may call: the listen policy, TLS credentials and bearer-token authentication."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from task_runner.server.access import Entry, peer_of
from task_runner.server.callers import Callers
from task_runner.server.config import Config

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # load balancers probe without credentials
UNAUTHENTICATED = "missing or wrong bearer token, or a client certificate that names no caller"


class SecurityError(RuntimeError):
    """A configuration that would expose the daemon, or credentials that cannot be read."""


def is_loopback(address: str) -> bool:
    """Whether a listen address is private to this machine's permitted users (unix sockets, loopback).

    An abstract unix socket has no file permissions, so any local process can connect: not private.
    """
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or a wildcard such as 0.0.0.0 / [::]


def authenticated(config: Config) -> bool:
    """Whether every call must present a token or a client certificate that names its caller."""
    return config.auth.enabled or bool(config.callers)


def check_exposure(config: Config) -> None:
    """Refuse a non-loopback TCP listener without TLS or a token, unless the operator said `insecure`."""
    exposed = [a for a in config.listen if not is_loopback(a)]
    tokens = config.auth.enabled or any(c.token_file or c.token_env for c in config.callers.values())
    if exposed and not (config.tls.enabled or tokens or config.insecure):
        raise SecurityError(
            f"refusing to listen on {', '.join(exposed)} without TLS or a token: anyone who can reach it "
            "could run tasks. Configure [tls] or [auth], or set insecure = true (--insecure) to accept that.",
        )


def open_to_tasks(config: Config, same_user: bool = False) -> list[str]:
    """The listen addresses a task process could call its own daemon on.

    A task may not call its daemon (a task waiting on its own call holds a slot while it waits;
    all of them doing so would hold every slot). A task has neither the token nor a client key,
    and, running as another user, cannot open a unix socket that is closed to others; so only a
    TCP address that needs neither token nor client certificate, or a unix socket open to others,
    lets it in. Tasks of the daemon's own user (`same_user`: no run_as_user) open every unix socket.
    """
    if authenticated(config):
        return []
    open_unix = same_user or int(config.unix_socket_mode, 8) & 0o007
    return [a for a in config.listen
            if (a.startswith("unix:") and open_unix) or (not a.startswith("unix:") and not config.tls.client_ca_file)]


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials for TCP listeners (mTLS when a client CA is configured), or None."""
    tls = config.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    try:
        key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
        client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    except OSError as exc:
        raise SecurityError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None,
    )


if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class CallerAuth(_Interceptor):
    """Turns away, before any handler runs, a call whose bearer token names no caller, where a token is the
    only way in (the servicer finds each call's caller again, certificates included). Health checks pass."""

    def __init__(self, current: Callable[[], Callers]) -> None:
        self._current = current

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        callers = self._current()
        if (not callers.required or not callers.tokens_only or details.method.startswith(HEALTH_PREFIX)
                or callers.identify(details.invocation_metadata, None) is not None):
            return await continuation(details)
        method = details.method.rsplit("/", 1)[-1]

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            size = len(request) if isinstance(request, bytes) else 0
            Entry(method, peer_of(context), "", size, time.monotonic(), status="UNAUTHENTICATED").write()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        async def deny_streaming(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await deny(b"", context)

        if "Reflection" in details.method:
            return grpc.stream_stream_rpc_method_handler(deny_streaming)
        return grpc.unary_unary_rpc_method_handler(deny)

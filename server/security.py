"""Who may call: the listen policy, TLS credentials and bearer-token authentication."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from task_runner.server.config import Config

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # load balancers probe without credentials


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


def check_exposure(config: Config) -> None:
    """Refuse a non-loopback TCP listener without TLS or a token, unless the operator said `insecure`."""
    exposed = [a for a in config.listen if not is_loopback(a)]
    if exposed and not (config.tls.enabled or config.auth.enabled or config.insecure):
        raise SecurityError(
            f"refusing to listen on {', '.join(exposed)} without TLS or a token: anyone who can reach it "
            "could run tasks. Configure [tls] or [auth], or set insecure = true (--insecure) to accept that.",
        )


def open_to_tasks(config: Config) -> list[str]:
    """The listen addresses a task process could call its own daemon on.

    A task may not call its daemon (a task waiting on its own call holds a slot while it waits;
    all of them doing so would hold every slot). A task has neither the token nor a client key,
    and, running as another user, cannot open a unix socket that is closed to others; so only a
    TCP address that needs neither token nor client certificate, or a unix socket open to others,
    lets it in.
    """
    if config.auth.enabled:
        return []
    open_unix = int(config.unix_socket_mode, 8) & 0o007
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


def load_token(config: Config) -> bytes | None:
    """The bearer token, from its file or environment variable (which is then removed from the environment)."""
    auth = config.auth
    if auth.token_file:
        try:
            token = Path(auth.token_file).read_text().strip()
        except OSError as exc:
            raise SecurityError(f"cannot read the token file {auth.token_file}: {exc.strerror}") from exc
    elif auth.token_env:
        token = os.environ.pop(auth.token_env, "").strip()
    else:
        return None
    if len(token) < 16:
        raise SecurityError("the bearer token is missing or shorter than 16 characters")
    return token.encode()


if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class TokenAuth(_Interceptor):
    """Requires `authorization: Bearer <token>` on every call but health checks; compared in constant time."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token
        self._deny_unary = grpc.unary_unary_rpc_method_handler(self._deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(self._deny_streaming)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(details)
        return self._deny_stream if "Reflection" in details.method else self._deny_unary

    @staticmethod
    async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    @staticmethod
    async def _deny_streaming(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

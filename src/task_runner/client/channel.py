"""Targets, channel options and call deadlines shared by the blocking and asyncio clients."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

DEFAULT_TARGET: Final = "127.0.0.1:50051"
TARGET_ENV: Final = "TASK_RUNNER_TARGET"
REQUEST_ID_HEADER: Final = "task-runner-request-id"  # the daemon's own name for it (task_runner.server.service)
SERVICE: Final = "task_runner.v1.TaskRunner"
RING_HASH_ENV: Final = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
# A fleet's service config: by request id over the daemons whose health says SERVING (a draining one
# says NOT_SERVING, and gets no new call). The README gives it to other languages' callers.
FLEET_SERVICE_CONFIG: Final = {
    "loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": REQUEST_ID_HEADER}}],
    "healthCheckConfig": {"serviceName": SERVICE},
}
# Time allowed beyond the task's own timeout for queueing and transport, when the caller sets none.
DEFAULT_GRACE_S: Final = 60.0
TOKEN_ENV: Final = "TASK_RUNNER_TOKEN"
TOKEN_FILE_ENV: Final = "TASK_RUNNER_TOKEN_FILE"
TLS_CA_ENV: Final = "TASK_RUNNER_TLS_CA"
TLS_CERT_ENV: Final = "TASK_RUNNER_TLS_CERT"
TLS_KEY_ENV: Final = "TASK_RUNNER_TLS_KEY"


@dataclass(frozen=True)
class Security:
    """How a client proves itself and checks the daemon: TLS files and a bearer token.

    Each falls back to an environment variable: TASK_RUNNER_TLS_CA, TASK_RUNNER_TLS_CERT,
    TASK_RUNNER_TLS_KEY, TASK_RUNNER_TOKEN (or TASK_RUNNER_TOKEN_FILE).
    """

    tls: bool | None = None  # None: TLS when any TLS file is given
    root_certs_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials for TLS (with a client certificate for mTLS), or None for plaintext."""
        roots = self.root_certs_file or os.environ.get(TLS_CA_ENV)
        cert = self.cert_file or os.environ.get(TLS_CERT_ENV)
        key = self.key_file or os.environ.get(TLS_KEY_ENV)
        if not (self.tls or roots or cert):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(roots), private_key=_read(key), certificate_chain=_read(cert),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the bearer token, if there is one."""
        token = self.token or os.environ.get(TOKEN_ENV)
        token_file = self.token_file or os.environ.get(TOKEN_FILE_ENV)
        if not token and token_file:
            token = Path(token_file).read_text().strip()
        return (("authorization", f"Bearer {token}"),) if token else ()


def routed(metadata: tuple[tuple[str, str], ...], request_id: str) -> tuple[tuple[str, str], ...]:
    """A call's metadata with its request id in REQUEST_ID_HEADER, which a balancer over several daemons
    hashes (gRPC's ring_hash, Envoy's hash_policy): a call, its retries, its Watch and its Cancel reach one daemon."""
    if not request_id or not (request_id.isascii() and request_id.isprintable()):
        return metadata  # no header can carry it: the daemon checks the id itself, and says what is wrong
    return (*metadata, (REQUEST_ID_HEADER, request_id))


def traced(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A call's metadata with the current OpenTelemetry trace context (`traceparent`, `tracestate`), where
    the program uses OpenTelemetry (it imported it); else `metadata` as it is, at no cost."""
    if "opentelemetry.context" not in sys.modules:
        return metadata
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return metadata + tuple((key, value) for key, value in carrier.items() if key in ("traceparent", "tracestate"))


def connect(target: Target, security: Security | None, aio: bool) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """A channel to `target` (a grpc.aio one if `aio`) and the metadata each call must carry."""
    address, options = resolve_target(target)
    security = security or Security()
    credentials = security.credentials()
    grpc_module: Any = grpc.aio if aio else grpc
    if credentials is not None:
        return grpc_module.secure_channel(address, credentials, options=options), security.metadata()
    return grpc_module.insecure_channel(address, options=options), security.metadata()


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _Default:
    """The sentinel for "the default deadline", so that None can mean "no deadline"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
Target = str | Sequence[str] | None


def resolve_target(target: Target) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target string and channel options for a target.

    A target is "host:port", "unix:/path", "dns:///name:port", or several "ip:port" (a list,
    or one string separated by commas). Several addresses, or a dns: name that resolves to
    several, are balanced round-robin over the healthy ones.
    None means $TASK_RUNNER_TARGET, else 127.0.0.1:50051.
    """
    if target is None:
        target = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    targets = [t.strip() for t in target.split(",")] if isinstance(target, str) else [t.strip() for t in target]
    targets = [t for t in targets if t]
    if not targets:
        raise ValueError("no target given")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.max_send_message_length", 256 << 20),
    ]
    if not is_fleet(targets):
        return targets[0], options
    # Several daemons (listed, or one DNS name with several addresses): each call goes to the daemon its
    # request id hashes to among the healthy ones (gRFC A76: ring_hash keyed on a request header, which
    # grpcio enables through this variable, read when a channel is made).
    os.environ.setdefault(RING_HASH_ENV, "true")
    options.append(("grpc.service_config", json.dumps(FLEET_SERVICE_CONFIG)))
    return (targets[0] if len(targets) == 1 else _multi_address(targets)), options


def is_fleet(target: Target) -> bool:
    """Whether `target` names several daemons (several addresses, or a dns: name that may resolve to several)."""
    if target is None:
        target = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    targets = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    return len(targets) > 1 or (len(targets) == 1 and targets[0].startswith("dns:"))


def _multi_address(targets: list[str]) -> str:
    """Several literal addresses as one target ("ipv4:a:p,b:p"), which gRPC balances itself."""
    families = set()
    for target in targets:
        host, _, port = target.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(
                f"with several targets each must be an IP address and port, not {target!r}; "
                "for a name that resolves to several addresses use one target, e.g. dns:///name:port",
            ) from None
        if not port.isdigit():
            raise ValueError(f"target {target!r} has no port")
    if len(families) > 1:
        raise ValueError("several targets must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(targets)}"


def rpc_timeout_s(timeout_ms: int | None, rpc_timeout: float | _Default | None) -> float | None:
    """The call's deadline in seconds from now: the caller's, or the task's timeout plus a grace."""
    if not isinstance(rpc_timeout, _Default):
        return rpc_timeout
    return timeout_ms / 1e3 + DEFAULT_GRACE_S if timeout_ms else None

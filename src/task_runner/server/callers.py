"""Who is calling: the named callers of a configuration, their credentials, and what each may do.

Every call is made by one `Caller`. Without [callers.*] and without [auth] every call is the
caller "default", with every right (as before callers existed); [auth]'s token is that same
"default" caller, and then, as soon as any caller is configured, a call must prove who it is:
with a bearer token (looked up by its SHA-256, then compared in constant time) or with the
client certificate of the mTLS handshake (a URI or DNS subject alternative name, or "CN=name").
Callers are loaded with each generation, so a reload adds, removes and changes them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from task_runner.server.admission import TaskRules
from task_runner.server.config import CallerConfig, Config


class CredentialsError(RuntimeError):
    """A caller's token cannot be read, is too short, or is another caller's too."""


MIN_TOKEN = 16
DEFAULT = "default"
_ENV_TOKENS: dict[str, str] = {}  # tokens taken from the environment, by variable


@dataclass(frozen=True)
class Caller:
    """A caller, as the daemon serves it."""

    name: str
    tasks: frozenset[str] | None = None  # the tasks it may run; None: all
    see_all: bool = True  # may Watch and Cancel other callers' calls
    rules: TaskRules = field(default_factory=TaskRules)  # its admission limits, for its calls together

    def may_run(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


ANYONE = Caller(DEFAULT)  # every call, where no caller is configured


def read_token(token_file: str | None, token_env: str | None, what: str) -> bytes | None:
    """A bearer token from its file or environment variable (which is then removed from the environment).

    Raises:
        CredentialsError: it cannot be read, or is shorter than MIN_TOKEN characters.
    """
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"cannot read the token file {token_file} of {what}: {exc.strerror}") from exc
    elif token_env:
        # Taken out of the environment (no task inherits it) and kept for the next reload to find.
        if token_env in os.environ:
            _ENV_TOKENS.setdefault(token_env, os.environ.pop(token_env))
        if token_env not in _ENV_TOKENS:
            raise CredentialsError(f"the token of {what} is missing: its token_env names the environment variable "
                                   f"{token_env}, which is not set")
        token = _ENV_TOKENS[token_env].strip()
    else:
        return None
    if len(token) < MIN_TOKEN:
        source = token_file or f"the variable {token_env}"
        raise CredentialsError(f"the token of {what} ({source}) is missing or shorter than {MIN_TOKEN} characters")
    return token.encode()


class Callers:
    """The callers of one configuration, found by the credentials a call presents."""

    def __init__(self, callers: Iterable[tuple[Caller, bytes | None, str | None]]) -> None:
        self.by_name: dict[str, Caller] = {}
        self._by_token: dict[bytes, tuple[bytes, Caller]] = {}  # sha256 of the token -> (token, caller)
        self._by_identity: dict[str, Caller] = {}
        for caller, token, identity in callers:
            self.by_name[caller.name] = caller
            if token is not None:
                digest = hashlib.sha256(token).digest()
                if digest in self._by_token:
                    raise CredentialsError(
                        f"callers {self._by_token[digest][1].name} and {caller.name} have the same token")
                self._by_token[digest] = (token, caller)
            if identity is not None:
                self._by_identity[identity] = caller
        # No credentials configured at all: every call is the caller "default", as before callers.
        self.required = bool(self._by_token or self._by_identity)
        self.tokens_only = not self._by_identity

    @classmethod
    def of(cls, config: Config) -> Callers:
        """The callers of `config`, their tokens read.

        Raises:
            CredentialsError: a token cannot be read, or two callers share one.
        """
        entries: list[tuple[Caller, bytes | None, str | None]] = []
        token = read_token(config.auth.token_file, config.auth.token_env, "[auth]")
        if token is not None or not config.callers:
            entries.append((ANYONE, token, None))
        for name, caller in config.callers.items():
            entries.append((_caller(name, caller),
                            read_token(caller.token_file, caller.token_env, f"callers.{name}"), caller.tls_identity))
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def by_token(self, presented: bytes) -> Caller | None:
        """The caller whose token is `presented`, or None."""
        found = self._by_token.get(hashlib.sha256(presented).digest())
        if found is None or not hmac.compare_digest(found[0], presented):
            return None
        return found[1]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                 peer: Mapping[str, Iterable[bytes]] | None) -> Caller | None:
        """Who makes a call with this metadata and this TLS peer (the auth context); None: nobody we know.

        A bearer token, when one is presented, decides; else the client certificate.
        """
        if not self.required:
            return self.by_name.get(DEFAULT, ANYONE)
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                scheme, _, token = presented.partition(b" ")
                return self.by_token(token) if scheme == b"Bearer" else None
        for name in certificate_names(peer or {}):
            caller = self._by_identity.get(name)
            if caller is not None:
                return caller
        return None


def certificate_names(peer: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The identities a verified client certificate proves: its subject alternative names (URIs, DNS
    names), then "CN=" its common name. gRPC puts them in the auth context only once the chain verified."""
    names = [value.decode(errors="replace") for value in peer.get("x509_subject_alternative_name", ())]
    names += ["CN=" + value.decode(errors="replace") for value in peer.get("x509_common_name", ())]
    return names


def _caller(name: str, caller: CallerConfig) -> Caller:
    tasks = None if "*" in caller.tasks else frozenset(caller.tasks)
    return Caller(name, tasks, caller.see_all, caller.rules)

"""What one kind of task process sets up of its sandbox: the parts, and the record the daemon sends the fork server."""

from __future__ import annotations

from typing import Any, NamedTuple

PARTS = ("filesystem", "network", "processes", "syscalls")


class Profile(NamedTuple):
    """What one kind of task process sets up; the daemon sends the distinct ones to the fork server."""

    filesystem: bool = False
    network: bool = False
    processes: bool = False
    seccomp: bytes = b""  # the filter to load last (task_runner.server.sandbox.seccomp), or none
    tmp_bytes: int = 256 << 20
    hide: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # bound back read-only under the private /tmp (the fork server's `code_paths`)

    @property
    def parts(self) -> set[str]:
        """The parts (of PARTS) it sets up."""
        wanted = (self.filesystem, self.network, self.processes, bool(self.seccomp))
        return {part for part, on in zip(PARTS, wanted, strict=True) if on}

    @property
    def private_tmp(self) -> bool:
        """Its /tmp is its own and its working directory: the daemon makes it none."""
        return self.filesystem

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "seccomp": self.seccomp.hex()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(data["filesystem"], data["network"], data["processes"], bytes.fromhex(data["seccomp"]),
                   data["tmp_bytes"], tuple(data["hide"]), tuple(data["writable"]), tuple(data.get("code", ())))

    def without(self, parts: set[str]) -> Profile:
        """This profile without the parts this machine cannot set up."""
        return self._replace(filesystem=self.filesystem and "filesystem" not in parts,
                             network=self.network and "network" not in parts,
                             processes=self.processes and "processes" not in parts,
                             seccomp=b"" if "syscalls" in parts else self.seccomp)

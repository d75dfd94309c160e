"""The systemd notify protocol (sd_notify(3)): READY=1, STOPPING=1, WATCHDOG=1 to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """Sends state changes to systemd, if it asked for them; otherwise does nothing.

    The socket's address is taken from the environment once and the variable removed, so no
    child process can ever see it.
    """

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.pop("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            # Non-blocking: a notify socket that stops reading must never stall the event loop.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *states: str) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # systemd going away or not reading must not take the daemon with it
                self._sock.sendto("\n".join(states).encode(), self._address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

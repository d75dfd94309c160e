"""A task's network: a namespace of its own with only its loopback, up: no route out, not the host's loopback,
no other task's abstract unix sockets."""

from __future__ import annotations

import ctypes
import os
import struct

from task_runner.server.sandbox.libc import AF_INET, IFF_UP, SIOCSIFFLAGS, SOCK_DGRAM, check, libc


def loopback_up() -> None:
    """Bring up the loopback of this process's (new) network namespace."""
    sock = check(libc.socket(AF_INET, SOCK_DGRAM, 0), "socket")  # ctypes, not the socket module's import
    try:
        request = ctypes.create_string_buffer(struct.pack("16sH22x", b"lo", IFF_UP), 40)
        check(libc.ioctl(sock, SIOCSIFFLAGS, request), "bring the loopback up")
    finally:
        os.close(sock)

"""One task run in one task process: hand it the task, gather its output, enforce the deadline, answer.

A task's options go straight to its process over the process's own channel, and its output
and answer come straight back: the fork server never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from task_runner.server import wire
from task_runner.server.answers import answer_response, failure_response, fill_usage
from task_runner.server.config import Config
from task_runner.server.forkclient import Exit, ForkServerClient, TaskProcess
from task_runner.server.wire import Stop
from task_runner.v1.task_runner_pb2 import PerformResponse

READ_CHUNK = 1 << 16
ANSWER_EXIT_GRACE_S = 1.0  # a process that answered yet lingers this long is killed


class Tail:
    """The last `cap` bytes of a stream, and how many came before them."""

    __slots__ = ("buffer", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.cap, self.buffer, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        self.buffer += data
        excess = len(self.buffer) - self.cap
        if excess > 0:
            del self.buffer[:excess]
            self.dropped += excess


class Run:
    """One task run in one task process: hand it the task, gather output, enforce the deadline, answer.

    The answer is ready as soon as the task's answer frame arrives (the process ends itself
    right after it) or the process is reaped, whichever is first. The process keeps its slot
    until it is reaped: `reaped` is the process's exit future.
    """

    def __init__(self, server: ForkServerClient, process: TaskProcess, config: Config,
                 cpu_limit_s: int | None = None) -> None:
        self._server, self.process, self._config = server, process, config
        self._cpu_limit_s = cpu_limit_s
        self._loop = asyncio.get_running_loop()
        self._stdout = Tail(config.output_tail_bytes)
        self._stderr = Tail(config.output_tail_bytes)
        self._result = bytearray()
        self._settled: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._limit = wire.FRAME.size + config.result_max_bytes + (64 << 10)  # the task checks; this guards
        self.reaped = process.exited

    def stop(self, why: Stop) -> None:
        self._server.kill(self.process, why)

    async def execute(self, assignment: bytes, request: bytes, deadline: float) -> tuple[PerformResponse, float]:
        """Run the task: `assignment` from wire.Assignment.head, then the serialized request.

        Returns:
            The response, usage and output filled, and when the task was handed over.
        """
        process, loop = self.process, self._loop
        handed_at = loop.time()
        self._timer = loop.call_at(deadline, self.stop, Stop.TIMEOUT)  # armed first: even the hand-over is timed
        process.exited.add_done_callback(self._on_exit)
        with contextlib.suppress(OSError):  # a spare that died: its exit report tells how
            await loop.sock_sendall(process.channel, assignment)
            await loop.sock_sendall(process.channel, request)
        del request  # sent: the daemon holds no copy of it while the task runs
        loop.add_reader(process.channel.fileno(), self._read_result)
        loop.add_reader(process.stdout, self._read_output, process.stdout, self._stdout)
        loop.add_reader(process.stderr, self._read_output, process.stderr, self._stderr)
        await self._settled
        settled_at = loop.time()
        self._drain()
        frame = self._frame()
        if frame is not None:
            response = answer_response(frame)
            response.usage.wall_ms = (settled_at - handed_at) * 1e3
            # The process ends itself right after answering; should it linger, it gets a second.
            self._timer.cancel()
            self._timer = loop.call_later(ANSWER_EXIT_GRACE_S, self.stop, Stop.LINGERED)
        else:
            exit_ = process.exited.result()
            response = failure_response(exit_, deadline - handed_at, self._limit, self._cpu_limit_s)
            fill_usage(response, exit_, handed_at)
        for output, tail in ((response.stdout, self._stdout), (response.stderr, self._stderr)):
            output.tail, output.dropped_bytes = bytes(tail.buffer), tail.dropped
        response.timings.run_ms = (settled_at - handed_at) * 1e3
        response.timings.collect_ms = (loop.time() - settled_at) * 1e3
        return response, handed_at

    def _on_exit(self, exited: asyncio.Future[Exit]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._settled.done():
            self._settled.set_result(None)

    def _read_result(self) -> None:
        try:
            data = self.process.channel.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.process.channel.fileno())
            return
        self._result += data
        if len(self._result) > self._limit:
            self._loop.remove_reader(self.process.channel.fileno())
            self.stop(Stop.RESULT_TOO_LARGE)
        elif not self._settled.done() and self._frame() is not None:
            self._settled.set_result(None)

    def _read_output(self, fd: int, tail: Tail) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            tail.add(data)
        else:
            self._loop.remove_reader(fd)

    def _drain(self) -> None:
        """Take what is already buffered, without waiting for more, and close the daemon's ends."""
        process, loop = self.process, self._loop
        loop.remove_reader(process.channel.fileno())
        with contextlib.suppress(OSError):
            while len(self._result) <= self._limit and (data := process.channel.recv(READ_CHUNK)):
                self._result += data
        for fd, tail in ((process.stdout, self._stdout), (process.stderr, self._stderr)):
            loop.remove_reader(fd)
            # The task flushed its output before answering; a descendant may still hold the pipe
            # and write on, so read what is there now and stop.
            with contextlib.suppress(OSError):
                for _ in range(64):
                    data = os.read(fd, READ_CHUNK)
                    if not data:
                        break
                    tail.add(data)
        process.close()

    def _frame(self) -> bytes | None:
        if len(self._result) < wire.FRAME.size:
            return None
        (size,) = wire.FRAME.unpack_from(self._result)
        end = wire.FRAME.size + size
        return bytes(self._result[wire.FRAME.size:end]) if len(self._result) >= end else None

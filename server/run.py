"""One task run in one task process: hand it the task, gather its output, enforce the deadline, answer.

A task's options go straight to its process over the process's own channel, and its output
and answer come straight back: the fork server never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

from task_runner.server import wire
from task_runner.server.answers import Kind, answer_response, error_response, failure_response, fill_usage
from task_runner.server.config import Config
from task_runner.server.events import EventLog, Stream, beat_event
from task_runner.server.forkclient import Exit, ForkServerClient, TaskProcess
from task_runner.server.wire import ANSWER, HEARTBEAT, PROGRESS, Stop
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformResponse

READ_CHUNK = 1 << 16
ANSWER_EXIT_GRACE_S = 1.0  # a process that answered yet lingers this long is killed
MAX_BEAT_BYTES = 64 << 10  # a progress or heartbeat frame above this is dropped


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
    """One task run in one task process: hand it the task, gather output and events, enforce the
    deadline, the notice before it and the heartbeat timeout; answer.

    The answer is ready as soon as the task's answer frame arrives (the process ends itself
    right after it) or the process is reaped, whichever is first. The process keeps its slot
    until it is reaped: `reaped` is the process's exit future.
    """

    def __init__(self, server: ForkServerClient, process: TaskProcess, config: Config,
                 cpu_limit_s: int | None = None, events: EventLog | None = None) -> None:
        self._server, self.process, self._config = server, process, config
        self._cpu_limit_s = cpu_limit_s
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._stdout = Tail(config.output_tail_bytes)
        self._stderr = Tail(config.output_tail_bytes)
        self._incoming = bytearray()  # of the channel, up to the end of the last whole frame
        self._answer: bytes | None = None
        self._unknown_frame = False
        self._settled: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None  # the kill at the deadline (or at a notice's end)
        self._notice_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_s: float | None = None
        self._last_beat = 0.0
        self._kill_at = float("inf")
        self._limit = wire.FRAME.size + config.result_max_bytes + (64 << 10)  # the task checks; this guards
        self.noticed: Stop | None = None  # why the task was told to stop, if it was
        self.grace_s = 0.0  # its notice before it is killed
        self.reaped = process.exited

    def stop(self, why: Stop) -> None:
        """Kill the task's tree now."""
        self._server.kill(self.process, why)

    def notice(self, why: Stop, grace_s: float) -> None:
        """Tell the task to stop (SIGTERM to its process group, task_runner.task.cancelled() true); kill it
        `grace_s` from now, or at its deadline if that is sooner, unless it answers first."""
        if self.reaped.done() or self._answer is not None:
            return
        if self.noticed is None:
            self.noticed = why
            self._server.notice(self.process)
        self._kill(self._loop.time() + grace_s, why)

    def _kill(self, at: float, why: Stop) -> None:
        if at < self._kill_at:
            self._kill_at = at
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(at, self.stop, why)

    async def execute(self, assignment: bytes, request: bytes, deadline: float, grace_s: float = 0.0,
                      stall_s: float | None = None) -> tuple[PerformResponse, float]:
        """Run the task: `assignment` from wire.Assignment.head, then the serialized request.

        Args:
            deadline: loop time its tree is killed.
            grace_s: told to stop this long before the deadline (0: not told).
            stall_s: once it has sent a heartbeat, killed as STALLED after this long without one.

        Returns:
            The response, usage and output filled, and when the task was handed over.
        """
        process, loop = self.process, self._loop
        handed_at = loop.time()
        self._kill(deadline, Stop.TIMEOUT)  # armed first: even the hand-over is timed
        if grace_s > 0:
            self._notice_timer = loop.call_at(max(handed_at, deadline - grace_s), self.notice, Stop.TIMEOUT,
                                              grace_s)
        self._stall_s = stall_s
        process.exited.add_done_callback(self._on_exit)
        with contextlib.suppress(OSError):  # a spare that died: its exit report tells how
            await loop.sock_sendall(process.channel, assignment)
            await loop.sock_sendall(process.channel, request)
        del request  # sent: the daemon holds no copy of it while the task runs
        loop.add_reader(process.channel.fileno(), self._read_channel)
        loop.add_reader(process.stdout, self._read_output, process.stdout, self._stdout, Stream.STDOUT)
        loop.add_reader(process.stderr, self._read_output, process.stderr, self._stderr, Stream.STDERR)
        await self._settled
        settled_at = loop.time()
        for timer in (self._notice_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._drain()
        if self._unknown_frame:
            response = error_response(Kind.RESULT_INVALID, "ResultInvalid",
                                      "the task process sent a frame of no known kind on its channel")
        elif self._answer is not None:
            response = answer_response(self._answer)
            response.usage.wall_ms = (settled_at - handed_at) * 1e3
        if self._answer is not None or self._unknown_frame:
            # The process ends itself right after answering; should it linger, it gets a second.
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_later(ANSWER_EXIT_GRACE_S, self.stop, Stop.LINGERED)
        else:
            exit_ = process.exited.result()
            response = failure_response(exit_, deadline - handed_at, self._limit, self._cpu_limit_s, self.noticed,
                                        self._stall_s)
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

    def _read_channel(self) -> None:
        try:
            data = self.process.channel.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.process.channel.fileno())
            return
        self._incoming += data
        self._parse()

    def _parse(self) -> None:
        """Take every whole frame received: events as they come, the answer last."""
        buffer, offset, header = self._incoming, 0, wire.FRAME.size
        while self._answer is None and not self._unknown_frame and len(buffer) - offset >= header:
            (size,) = wire.FRAME.unpack_from(buffer, offset)
            if size > self._limit:
                self._loop.remove_reader(self.process.channel.fileno())
                self.stop(Stop.RESULT_TOO_LARGE)
                buffer.clear()
                return
            end = offset + header + size
            if len(buffer) < end:
                break
            kind, payload = bytes(buffer[offset + header:offset + header + 1]), bytes(buffer[offset + header + 1:end])
            offset = end
            if kind == ANSWER:
                self._answer = payload
            elif kind in (PROGRESS, HEARTBEAT):
                self._on_beat(kind, payload)
            else:
                self._unknown_frame = True
        del buffer[:offset]
        if (self._answer is not None or self._unknown_frame) and not self._settled.done():
            self._settled.set_result(None)

    def _on_beat(self, kind: bytes, payload: bytes) -> None:
        """A progress or heartbeat frame: the task is alive; pass it on to the execution's events."""
        self._last_beat = self._loop.time()
        if self._stall_s is not None and self._stall_timer is None:
            self._stall_timer = self._loop.call_at(self._last_beat + self._stall_s, self._check_stall)
        if self._events is not None and len(payload) <= MAX_BEAT_BYTES:  # bigger ones are dropped
            self._events.coalesce(kind.decode(), functools.partial(beat_event, kind, payload))

    def _check_stall(self) -> None:
        assert self._stall_s is not None
        silent_until = self._last_beat + self._stall_s
        if self._loop.time() >= silent_until:
            self._stall_timer = None
            self.stop(Stop.STALLED)
        else:
            self._stall_timer = self._loop.call_at(silent_until, self._check_stall)

    def _read_output(self, fd: int, tail: Tail, stream: PerformEvent.OutputChunk.Stream.ValueType) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            tail.add(data)
            if self._events is not None:
                self._events.output(stream, data)
        else:
            self._loop.remove_reader(fd)

    def _drain(self) -> None:
        """Take what is already buffered, without waiting for more, and close the daemon's ends."""
        process, loop = self.process, self._loop
        loop.remove_reader(process.channel.fileno())
        with contextlib.suppress(OSError):
            while (self._answer is None and not self._unknown_frame and len(self._incoming) <= self._limit
                   and (data := process.channel.recv(READ_CHUNK))):
                self._incoming += data
                self._parse()
        for fd, tail, stream in ((process.stdout, self._stdout, Stream.STDOUT),
                                 (process.stderr, self._stderr, Stream.STDERR)):
            loop.remove_reader(fd)
            # The task flushed its output before answering; a descendant may still hold the pipe
            # and write on, so read what is there now and stop.
            with contextlib.suppress(OSError):
                for _ in range(64):
                    data = os.read(fd, READ_CHUNK)
                    if not data:
                        break
                    tail.add(data)
                    if self._events is not None:
                        self._events.output(stream, data)
        process.close()

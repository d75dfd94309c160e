"""One task run in one task process: hand it the task, gather its output, enforce the deadline, answer.

A task's options go straight to its process over the process's own channel, and its output
and answer come straight back: the fork server never sees them.

The channel's frames are the runner's verdict on the options (first, before any task code ran),
then the task's progress and heartbeats, then its answer. Each turn of the event loop reads a
channel at most once and parses at most FRAMES_PER_TURN frames of all channels together (CHANNEL_SHARE
of one at a time; channels with frames left wait their turn, unread meanwhile), and of the progress
and heartbeats parsed at once only the last of each is passed on: tasks writing tiny frames as fast
as they can, however many, are slowed to the daemon's pace and delay no other call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import weakref

from task_runner import frames
from task_runner.frames import HEARTBEAT, PROGRESS, error_response
from task_runner.server.answers import Kind, answer_response, failure_response, fill_usage
from task_runner.server.config import Config
from task_runner.server.events import EventLog, Stream, beat_event
from task_runner.server.forkclient import ForkServerClient, TaskProcess
from task_runner.server.wire import Exited, Stop
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformResponse

READ_CHUNK = 1 << 16
FRAMES_PER_TURN = 512  # the most frames of all task channels parsed in one turn of the event loop
CHANNEL_SHARE = 128  # of them, the most of one channel before the next one's turn
DRAIN_RECVS = 64  # after the process ended, at most this many reads take what its channel still holds
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
        self._limit = frames.FRAME.size + config.result_max_bytes + (64 << 10)  # the task checks; this guards
        self._reader = frames.Reader(self._limit, MAX_BEAT_BYTES)  # what the channel brought
        self.first_frame: asyncio.Future[None] = self._loop.create_future()  # done once it came (or none will)
        self._pump = _pump(self._loop)
        self._reading = False  # the channel's reader is registered
        self._channel_done = False  # nothing more is taken from the channel (an end, its end of file, a kill)
        self._caught_up: asyncio.Future[None] | None = None  # while draining: the pump parsed all there was
        self._settled: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None  # the kill at the deadline (or at a notice's end)
        self._notice_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_s: float | None = None
        self._last_beat = 0.0
        self._kill_at = float("inf")
        self.noticed: Stop | None = None  # why the task was told to stop, if it was
        self.grace_s = 0.0  # its notice before it is killed
        self.reaped = process.exited

    @property
    def options_invalid(self) -> str | None:
        """The runner's verdict on the options, if they were invalid."""
        return self._reader.options_invalid

    @property
    def values_digest(self) -> bytes:
        """Its options' digest, as the runner's first frame gave it (execution.values_digest)."""
        return self._reader.digest

    def stop(self, why: Stop) -> None:
        """Kill the task's tree now."""
        self._server.kill(self.process, why)

    def notice(self, why: Stop, grace_s: float) -> None:
        """Tell the task to stop (SIGTERM to its process group, task_runner.task.cancelled() true); kill it
        `grace_s` from now, or at its deadline if that is sooner, unless it answers first."""
        if self.reaped.done() or self._ended:
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
        """Run the task: `assignment` from frames.Assignment.head, then the serialized request.

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
        self._reading = True
        loop.add_reader(process.stdout, self._read_output, process.stdout, self._stdout, Stream.STDOUT)
        loop.add_reader(process.stderr, self._read_output, process.stderr, self._stderr, Stream.STDERR)
        await self._settled
        settled_at = loop.time()
        for timer in (self._notice_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        await self._drain()
        reader = self._reader
        if reader.invalid is not None:
            response = error_response(Kind.RESULT_INVALID, "ResultInvalid", reader.invalid)
        elif reader.options_invalid is not None:  # the executor refuses the call: no caller sees this
            response = error_response(Kind.KIND_UNSPECIFIED, "InvalidOptions", reader.options_invalid)
        elif reader.answer is not None:
            response = answer_response(reader.answer)
            response.usage.wall_ms = (settled_at - handed_at) * 1e3
        if self._ended:
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

    def _on_exit(self, exited: asyncio.Future[Exited]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._settled.done():
            self._settled.set_result(None)

    @property
    def _ended(self) -> bool:
        """The channel said how the run ends: the task's answer, an invalid frame, or invalid options."""
        return self._reader.ended

    def _read_channel(self) -> None:
        """The channel is readable: read once; its frames are parsed now or, if others wait, in their turn."""
        try:
            data = self.process.channel.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading(done=True)
            return
        self._reader.feed(data)
        if self._pump.take(self):
            self._stop_reading(done=False)  # nothing more is read until the pump has parsed what is here

    def parsed(self) -> None:
        """The pump parsed every whole frame this channel had waiting: read on (or let the drain go on)."""
        if self._caught_up is not None:
            if not self._caught_up.done():
                self._caught_up.set_result(None)
        elif not self._reading and not self._channel_done:
            self._loop.add_reader(self.process.channel.fileno(), self._read_channel)
            self._reading = True

    def _stop_reading(self, done: bool) -> None:
        if self._reading:
            self._loop.remove_reader(self.process.channel.fileno())
            self._reading = False
        self._channel_done = self._channel_done or done

    def parse(self, budget: int) -> tuple[int, bool]:
        """Take up to `budget` whole frames received (frames.Reader.parse), and act on them.

        Returns:
            How many frames it took, and whether whole frames are left for another turn.
        """
        reader = self._reader
        parsed = reader.parse(budget)
        if reader.first_came and not self.first_frame.done():
            self.first_frame.set_result(None)
        if parsed.beats:
            self._on_beats(parsed)
        if reader.too_large:
            self._stop_reading(done=True)
            self.stop(Stop.RESULT_TOO_LARGE)
            return parsed.frames, False
        if reader.ended:
            self._stop_reading(done=True)
            if not self._settled.done():
                self._settled.set_result(None)
            return parsed.frames, False
        return parsed.frames, parsed.more

    def _on_beats(self, parsed: frames.Parsed) -> None:
        """Progress and heartbeat frames came: the task is alive; pass the last of each on to the execution's
        events, and count the others (and any too big to pass on) as dropped."""
        self._last_beat = self._loop.time()
        if self._stall_s is not None and self._stall_timer is None:
            self._stall_timer = self._loop.call_at(self._last_beat + self._stall_s, self._check_stall)
        if self._events is None:
            return
        lost = parsed.beats
        for kind, payload in ((PROGRESS, parsed.progress), (HEARTBEAT, parsed.heartbeat)):
            if payload is not None:
                lost -= 1
                self._events.coalesce(kind.decode(), functools.partial(beat_event, kind, payload))
        if lost:
            self._events.lost(lost)

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

    async def _drain(self) -> None:
        """Take what is already buffered, without waiting for more (parsed by the pump, in turn with every
        other channel), and close the daemon's ends."""
        process, loop = self.process, self._loop
        self._stop_reading(done=False)
        self._caught_up = loop.create_future()
        recvs = 0
        try:
            if self._pump.waiting(self):
                await self._caught_up  # frames already read are parsed first
            with contextlib.suppress(OSError):  # BlockingIOError: nothing more is there
                while not self._channel_done and not self._ended and recvs < DRAIN_RECVS:
                    data = process.channel.recv(READ_CHUNK)
                    if not data:
                        break
                    recvs += 1
                    self._reader.feed(data)
                    self._caught_up = loop.create_future()
                    if self._pump.take(self):
                        await self._caught_up
        finally:
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


class _Pump:
    """Parses the frames received on the task channels of one event loop: FRAMES_PER_TURN at most in all each
    turn of the loop, CHANNEL_SHARE at most of one channel at a time. A channel with whole frames left waits
    its turn, in order, unread meanwhile (its task blocks once the socket is full): however many tasks flood
    their channels, a turn of the loop stays short and every other call's timers fire on time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._left = FRAMES_PER_TURN  # of this turn's frames (refilled by the next turn's `_turn`)
        self._waiting: collections.deque[Run] = collections.deque()
        self._turn_handle: asyncio.Handle | None = None

    def take(self, run: Run) -> bool:
        """Parse what `run` received now if this turn has room and no other channel waits; returns whether
        it waits (then `run.parsed()` is called once the pump has parsed its whole frames)."""
        if self._waiting or self._left <= 0 or self._serve(run):
            self._waiting.append(run)
            if self._turn_handle is None:
                self._turn_handle = self._loop.call_soon(self._turn)
            return True
        return False

    def waiting(self, run: Run) -> bool:
        return run in self._waiting

    def _serve(self, run: Run) -> bool:
        used, more = run.parse(min(self._left, CHANNEL_SHARE))
        self._left -= used
        return more

    def _turn(self) -> None:
        self._turn_handle = None
        self._left = FRAMES_PER_TURN
        waiting = self._waiting
        for _ in range(len(waiting)):
            if self._left <= 0:
                break
            run = waiting.popleft()
            if self._serve(run):
                waiting.append(run)
            else:
                run.parsed()
        if waiting:
            self._turn_handle = self._loop.call_soon(self._turn)


_pumps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pump] = weakref.WeakKeyDictionary()


def _pump(loop: asyncio.AbstractEventLoop) -> _Pump:
    """The pump of `loop`'s task channels (one a loop: its budget is the loop's)."""
    pump = _pumps.get(loop)
    if pump is None:
        pump = _pumps[loop] = _Pump(loop)
    return pump

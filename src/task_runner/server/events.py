"""An execution's events (PerformEvent), bounded: what PerformStream and Watch send.

Each execution has one `EventLog`: events get a sequence number and a time as they are added,
the last MAX_EVENTS (and MAX_BYTES) are kept for a Watch to replay, and every follower
(a PerformStream or Watch) has a queue of its own, bounded in events and in bytes (FOLLOWER_MAX,
FOLLOWER_MAX_BYTES): one that falls behind loses the oldest events it has not read, and is told
how many with a `gap` event; the response, last, is never lost. Progress and heartbeats are
coalesced (the latest wins, at most one every COALESCE_S), output is sent in chunks at most every
COALESCE_S, so a task that reports or prints as fast as it can, and a follower that stops reading,
cost the daemon bounded memory and time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import DecodeError

from task_runner.frames import PROGRESS
from task_runner.v1.task_runner_pb2 import PerformEvent

COALESCE_S = 0.05
MAX_EVENTS = 256  # kept per execution for a Watch to replay
MAX_BYTES = 256 << 10
KEPT_BYTES = 32 << 10  # of a finished execution's events, for a Watch after the end
FOLLOWER_MAX = 1024  # events a follower may lag behind before it loses the oldest
FOLLOWER_MAX_BYTES = 1 << 20  # and bytes of them (the newest is kept whatever its size: the response may be bigger)
OUTPUT_CHUNK = 64 << 10  # the most one output event carries; more in one interval is dropped (counted)
_RESPONSE_FIELD = bytes([8 << 3 | 2])  # PerformEvent.response, a length-delimited field
Stream = PerformEvent.OutputChunk.Stream


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Follower:
    """The events a follower has not read yet, None last once nothing follows."""

    def __init__(self) -> None:
        self.queue: collections.deque[bytes | None] = collections.deque()
        self.nbytes = 0  # of the events in the queue
        self.dropped = 0  # events lost since the last read
        self.wake = asyncio.Event()

    def push(self, data: bytes | None) -> int:
        """Queue an event (None: the end, after the last); returns how many of the oldest it lost for room.
        The newest is always kept, so the response, the last event, always reaches the follower."""
        queue, lost = self.queue, 0
        if data is not None:
            self.nbytes += len(data)
            while (len(queue) >= FOLLOWER_MAX or self.nbytes > FOLLOWER_MAX_BYTES) and queue:
                self.nbytes -= len(queue.popleft() or b"")
                lost += 1
            self.dropped += lost
        queue.append(data)
        self.wake.set()
        return lost

    def pop(self) -> bytes | None:
        data = self.queue.popleft()
        if data is not None:
            self.nbytes -= len(data)
        return data


class EventLog:
    """The events of one execution.

    Args:
        started_at: loop time the call arrived (event times count from it).
        on_dropped: called with a count of events a follower lost, or of progress and heartbeats no event
            carries (coalesced away, or too big), for the metrics.
    """

    def __init__(self, started_at: float, on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self._loop = asyncio.get_running_loop()
        self._started_at = started_at
        self._on_dropped = on_dropped
        self._events: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self._sequence = 0
        self._followers: set[_Follower] = set()
        self._pending: dict[str, Callable[[], PerformEvent | None]] = {}  # coalesced, waiting for their interval
        self._last_sent: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._output = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        self._output_dropped = {Stream.STDOUT: 0, Stream.STDERR: 0}
        self.closed = False  # the response is in: nothing follows it

    @property
    def nbytes(self) -> int:
        return self._bytes

    def add(self, event: PerformEvent) -> None:
        """Add an event now (queued, started, gap-free kinds)."""
        if self.closed:
            return
        self._append(event, b"")

    def coalesce(self, key: str, build: Callable[[], PerformEvent | None]) -> None:
        """Add a progress or heartbeat event, at most one of each `key` every COALESCE_S; the latest wins.
        `build` makes it (None: no event after all) and is called only for the one that is added, so a
        task sending thousands a second costs a dict store each, not a decode."""
        if self.closed:
            return
        now = self._loop.time()
        if now - self._last_sent.get(key, -1.0) >= COALESCE_S and key not in self._pending:
            self._last_sent[key] = now
            self._add_built(build)
            return
        if key in self._pending:
            self._on_dropped(1)  # the one it replaces is never sent
        self._pending[key] = build
        self._arm()

    def lost(self, count: int) -> None:
        """Count `count` progress or heartbeat frames no event will carry (the channel's reader coalesced them)."""
        self._on_dropped(count)

    def _add_built(self, build: Callable[[], PerformEvent | None]) -> None:
        event = build()
        if event is not None:
            self._append(event, b"")

    def output(self, stream: PerformEvent.OutputChunk.Stream.ValueType, data: bytes) -> None:
        """Output the task wrote: sent in chunks, at most OUTPUT_CHUNK bytes of a stream per interval."""
        if self.closed:
            return
        buffer = self._output[stream]
        room = OUTPUT_CHUNK - len(buffer)
        buffer += data[:room]
        if len(data) > room:
            self._output_dropped[stream] += len(data) - max(room, 0)
        self._arm()

    def _arm(self) -> None:
        if self._flush is None:
            self._flush = self._loop.call_later(COALESCE_S, self.flush)

    def flush(self) -> None:
        """Add what waits to be coalesced (and the output gathered) now."""
        self._flush = None
        now = self._loop.time()
        for key, build in list(self._pending.items()):
            self._last_sent[key] = now
            self._add_built(build)
        self._pending.clear()
        for stream, buffer in self._output.items():
            if buffer or self._output_dropped[stream]:
                chunk = PerformEvent.OutputChunk(stream=stream, data=bytes(buffer),
                                                 dropped_bytes=self._output_dropped[stream])
                buffer.clear()
                self._output_dropped[stream] = 0
                event = PerformEvent()
                event.output.CopyFrom(chunk)
                self._append(event, b"")

    def finish(self, answer: bytes) -> None:
        """Add the response (a serialized PerformResponse, as the unary Perform answers it), last."""
        if self.closed:
            return
        if self._flush is not None:
            self._flush.cancel()
        self.flush()
        self._append(PerformEvent(), _RESPONSE_FIELD + _varint(len(answer)) + answer)
        self.closed = True
        for follower in self._followers:
            follower.push(None)

    def end(self) -> None:
        """No response will come (the call was refused, or every caller left): followers stop here."""
        if self.closed:
            return
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.closed = True
        for follower in self._followers:
            follower.push(None)

    def trim(self, max_bytes: int) -> None:
        """Keep at most `max_bytes` of the latest events (the response, last, always): what a finished
        execution keeps for a Watch, so that the idempotency cache holds many of them cheaply."""
        while self._bytes > max_bytes and len(self._events) > 1:
            _, old = self._events.popleft()
            self._bytes -= len(old)

    def _append(self, event: PerformEvent, tail: bytes) -> None:
        self._sequence += 1
        event.sequence = self._sequence
        event.time_ms = (self._loop.time() - self._started_at) * 1e3
        data = event.SerializeToString() + tail
        self._events.append((self._sequence, data))
        self._bytes += len(data)
        while len(self._events) > MAX_EVENTS or (self._bytes > MAX_BYTES and len(self._events) > 1):
            _, old = self._events.popleft()
            self._bytes -= len(old)
        for follower in self._followers:
            lost = follower.push(data)
            if lost:
                self._on_dropped(lost)

    async def follow(self) -> AsyncIterator[bytes]:
        """The serialized events: those still buffered (a gap event first if earlier ones are gone),
        then each as it comes, until the response."""
        follower = _Follower()
        first = self._events[0][0] if self._events else self._sequence + 1
        if first > 1:
            follower.dropped = first - 1
        for _, buffered in self._events:  # within MAX_BYTES and one event: the follower's bounds keep most of it
            lost = follower.push(buffered)
            if lost:
                self._on_dropped(lost)
        if self.closed:
            follower.push(None)
        self._followers.add(follower)
        try:
            while True:
                while not follower.queue:
                    follower.wake.clear()
                    await follower.wake.wait()
                if follower.dropped:
                    gap = PerformEvent()
                    gap.gap.events_dropped, follower.dropped = follower.dropped, 0
                    yield gap.SerializeToString()
                data = follower.pop()
                if data is None:
                    return
                yield data
        finally:
            self._followers.discard(follower)


def beat_event(kind: bytes, payload: bytes) -> PerformEvent | None:
    """The event for a task's progress or heartbeat frame; None for one the task process mangled."""
    event = PerformEvent()
    try:
        if kind == PROGRESS:
            event.progress.ParseFromString(payload)
        else:
            event.heartbeat.ParseFromString(payload)
    except DecodeError:
        return None
    return event

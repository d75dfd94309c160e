"""The task channel between a task process and the daemon: its frames, packed and parsed here and nowhere else.

The channel is the task process's fd 3, a stream socket of length-prefixed frames. The daemon sends
one Assignment frame (the limits, the working directory, the deadline, the request id, the caller, the
trace context, then the serialized PerformRequest as it came); the task process sends frames of a kind
byte and a payload: first, before any task code runs, the runner's own verdict on the options
(TASK_STARTS or OPTIONS_INVALID), then progress and heartbeats (PerformEvent.Progress, .Heartbeat) as
the task reports them (task_runner.task), and last its answer, one PerformResponse.

The task API, the task process (task_runner.server.forkserver.task_process) and the daemon (task_runner.server.run) all
use this module. It belongs to the root package, which never imports task_runner.server, and every task
process loads it: it imports only what a task process loads anyway (os, struct, typing) and the
generated messages.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from task_runner.v1.task_runner_pb2 import PerformResponse, TaskError

FRAME = struct.Struct("!I")  # the length of the frame that follows
NO_LIMIT = -1
BY_CGROUP = -2  # a limit the task's cgroup carries instead (pids.max)
# The kinds of frame a task process sends on its channel, each a kind byte then its payload.
PROGRESS, HEARTBEAT, ANSWER = b"P", b"H", b"A"  # PerformEvent.Progress, .Heartbeat, the PerformResponse
# The runner's own first frame, written before any task code runs: the options were read and the task
# starts (the digest of their values, task_runner.values.struct_digest), or they were invalid (the message,
# UTF-8). Only as the first frame are they the runner's.
TASK_STARTS, OPTIONS_INVALID = b"S", b"I"
_ASSIGNMENT = struct.Struct("!qqqqqqdHHHHH")
# Kind bytes as a bytearray indexes them, for the daemon's hot loop.
_PROGRESS, _HEARTBEAT, _ANSWER = PROGRESS[0], HEARTBEAT[0], ANSWER[0]
_TASK_STARTS, _OPTIONS_INVALID = TASK_STARTS[0], OPTIONS_INVALID[0]


class FrameError(ValueError):
    """A frame that is cut short or larger than its reader takes."""


class Limits(NamedTuple):
    """A task process's limits, each NO_LIMIT, BY_CGROUP or a value (bytes for memory and file size)."""

    memory: int
    cpu_s: int
    open_files: int
    processes: int
    file_size: int
    core: int  # bytes; 0: no core dump (the hard limit too)


class Assignment(NamedTuple):
    """What the daemon hands a task process with its request."""

    limits: Limits
    workdir: str
    deadline: float  # time.monotonic() when its tree is killed (CLOCK_MONOTONIC is the machine's)
    request_id: str
    caller: str  # the name of the caller whose call it is
    traceparent: str = ""  # the W3C trace context the task continues ("": none)
    tracestate: str = ""

    def head(self, request_size: int) -> bytes:
        """The frame's start; the serialized request of `request_size` bytes follows it, sent as it is."""
        texts = [text.encode() for text in (self.workdir, self.request_id, self.caller, self.traceparent,
                                            self.tracestate)]
        head = _ASSIGNMENT.pack(*self.limits, self.deadline, *map(len, texts)) + b"".join(texts)
        return FRAME.pack(len(head) + request_size) + head

    @classmethod
    def unpack(cls, frame: bytes) -> tuple[Assignment, bytes]:
        """The assignment in a frame (without its length), and the serialized request after it.

        Raises:
            FrameError: for a frame too short for the assignment it announces.
        """
        if len(frame) < _ASSIGNMENT.size:
            raise FrameError(f"an assignment frame of {len(frame)} bytes, below the {_ASSIGNMENT.size} of its head")
        fields = _ASSIGNMENT.unpack_from(frame)
        count = len(Limits._fields)
        limits, deadline, lengths = fields[:count], fields[count], fields[count + 1:]
        if _ASSIGNMENT.size + sum(lengths) > len(frame):
            raise FrameError(f"an assignment frame of {len(frame)} bytes, cut short of its texts")
        texts, at = [], _ASSIGNMENT.size
        for length in lengths:
            texts.append(frame[at:at + length].decode())
            at += length
        workdir, request_id, caller, traceparent, tracestate = texts
        return cls(Limits(*limits), workdir, deadline, request_id, caller, traceparent, tracestate), frame[at:]


def pack(kind: bytes, payload: bytes) -> bytes:
    """One frame a task process sends: its length, its kind, its payload."""
    return FRAME.pack(len(payload) + 1) + kind + payload


def write(fd: int, kind: bytes, payload: bytes) -> None:
    """Send one frame on a blocking fd, whole (the caller keeps other writers out meanwhile).

    Raises:
        OSError: the channel is gone.
    """
    view = memoryview(pack(kind, payload))
    while view:
        view = view[os.write(fd, view):]


def read(fd: int, limit: int | None = None) -> bytes | None:
    """Read one frame (without its length) from a blocking fd; None at end of file before it.

    Raises:
        FrameError: for end of file within the frame, or a frame above `limit` bytes (then nothing of it
            is read).
    """
    header = _read_exactly(fd, FRAME.size)
    if header is None:
        return None
    (size,) = FRAME.unpack(header)
    if limit is not None and size > limit:
        raise FrameError(f"a frame of {size} bytes, above the limit of {limit}")
    frame = _read_exactly(fd, size)
    if frame is None:
        raise FrameError(f"the channel ended within a frame of {size} bytes")
    return frame


def _read_exactly(fd: int, size: int) -> bytes | None:
    """`size` bytes, or None at end of file before any of them (FrameError after some)."""
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            if remaining == size:
                return None
            raise FrameError(f"the channel ended after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def error_response(kind: TaskError.Kind.ValueType, type_: str, message: str, traceback: str = "",
                   exit_code: int = 0, signal: int = 0) -> PerformResponse:
    """A response carrying a task error: the one builder, for the task process's answer and the daemon's alike."""
    response = PerformResponse()
    error = response.error
    error.kind, error.type, error.message, error.traceback = kind, type_, message, traceback
    error.exit_code, error.signal = exit_code, signal
    return response


class Parsed(NamedTuple):
    """What one `Reader.parse` took."""

    frames: int  # how many
    more: bool  # whole frames are left for another call
    beats: int  # progress and heartbeat frames among them
    progress: bytes | None  # the last progress's payload, unless it was above the reader's beat_limit
    heartbeat: bytes | None  # the last heartbeat's, likewise


class Reader:
    """The daemon's end of one task channel, without I/O: `feed` it what is received, `parse` takes whole
    frames in order, the runner's first, then progress and heartbeats, then the answer, and says how the
    channel ends (`answer`, `options_invalid`, `invalid`, `too_large`).

    Args:
        limit: the largest frame taken; a larger one sets `too_large` and the rest is dropped.
        beat_limit: the largest progress or heartbeat payload passed on (larger ones are counted only).
    """

    __slots__ = ("answer", "beat_limit", "buffer", "digest", "invalid", "limit", "options_invalid", "started",
                 "too_large")

    def __init__(self, limit: int, beat_limit: int) -> None:
        self.limit, self.beat_limit = limit, beat_limit
        self.buffer = bytearray()  # received, not yet parsed
        self.started = False  # the runner's first frame came: the options were read, the task started
        self.digest = b""  # the options' digest, as the runner's first frame gave it
        self.options_invalid: str | None = None  # the runner's verdict on the options, if they were invalid
        self.invalid: str | None = None  # why the frames make no valid answer (the daemon's RESULT_INVALID)
        self.answer: bytes | None = None  # the task's answer, a serialized PerformResponse
        self.too_large = False  # a frame above `limit` came

    def feed(self, data: bytes) -> None:
        if not self.too_large:
            self.buffer += data

    @property
    def ended(self) -> bool:
        """The frames said how the run ends: the task's answer, an invalid frame, or invalid options."""
        return self.answer is not None or self.invalid is not None or self.options_invalid is not None

    @property
    def first_came(self) -> bool:
        """The first frame came (or a frame that shows none will)."""
        return self.started or self.options_invalid is not None or self.invalid is not None

    def parse(self, budget: int) -> Parsed:
        """Take up to `budget` whole frames received, in order; of the progress and heartbeats among them only
        the last of each is passed on. Nothing is taken once the channel ended or a frame was too large."""
        if self.ended or self.too_large:
            return Parsed(0, False, 0, None, None)
        buffer, limit, unpack, header = self.buffer, self.limit, FRAME.unpack_from, FRAME.size
        available, offset, frames, beats = len(buffer), 0, 0, 0
        progress: tuple[int, int] | None = None  # where the last of each begins and ends
        heartbeat: tuple[int, int] | None = None
        started, more = self.started, False
        # The hot loop of a flooding task: a frame costs a header, a kind and a comparison or two.
        while available - offset >= header:
            if frames == budget:
                more = True
                break
            (size,) = unpack(buffer, offset)
            if size > limit:
                self.too_large = True
                break
            end = offset + header + size
            if end > available:
                break
            frames += 1
            kind = buffer[offset + header] if size else -1
            start, offset = offset + header + 1, end
            if not started:  # the runner's own, written before any task code ran: the only one it may be
                if kind == _TASK_STARTS:
                    started = True
                    self.digest = bytes(buffer[start:end])
                elif kind == _OPTIONS_INVALID:
                    self.options_invalid = buffer[start:end].decode(errors="replace")
                    break
                else:
                    self.invalid = "the task process's first frame on its channel was not the runner's"
                    break
            elif kind == _PROGRESS:
                progress, beats = (start, end), beats + 1
            elif kind == _HEARTBEAT:
                heartbeat, beats = (start, end), beats + 1
            elif kind == _ANSWER:
                self.answer = bytes(buffer[start:end])
                break
            elif kind in (_TASK_STARTS, _OPTIONS_INVALID):
                claimed = "options invalid" if kind == _OPTIONS_INVALID else "the task starts"
                self.invalid = (f"the task sent the runner's own first frame ({claimed!r}) after it started, "
                                "which only the runner gives")
                break
            else:
                self.invalid = "the task process sent a frame of no known kind on its channel"
                break
        self.started = started
        parsed = Parsed(frames, more, beats, self._payload(progress), self._payload(heartbeat))
        if self.too_large:
            buffer.clear()
        else:
            del buffer[:offset]
        return parsed

    def _payload(self, span: tuple[int, int] | None) -> bytes | None:
        if span is None or span[1] - span[0] > self.beat_limit:
            return None
        return bytes(self.buffer[span[0]:span[1]])

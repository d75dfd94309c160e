"""The task channel's frames (task_runner.frames) on their own: what is packed or written reads back the same,
a frame cut short or too large is refused, the daemon's reader takes whole frames in the channel's order; and
the root package, which owns them, never loads the server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from task_runner import frames
from task_runner.frames import (
    ANSWER,
    BY_CGROUP,
    HEARTBEAT,
    NO_LIMIT,
    OPTIONS_INVALID,
    PROGRESS,
    TASK_STARTS,
    Assignment,
    FrameError,
    Limits,
    Reader,
)
from task_runner.v1.task_runner_pb2 import PerformRequest, PerformResponse, TaskError

LIMIT = 1 << 16
Ends = tuple[socket.socket, socket.socket]
ASSIGNMENT = Assignment(Limits(256 << 20, NO_LIMIT, 64, BY_CGROUP, 1 << 30, 0), "/srv/work/ü 1", 12345.678,
                        "req-é", "caller", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "k=v")


@pytest.fixture
def channel() -> Iterator[Ends]:
    """The two ends of a stream socket, blocking (a task process's fd 3 and the daemon's end)."""
    task_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with task_end, daemon_end:
        yield task_end, daemon_end


def started(digest: bytes = b"d" * 32) -> Reader:
    """A reader past the runner's first frame."""
    reader = Reader(LIMIT, 1024)
    reader.feed(frames.pack(TASK_STARTS, digest))
    assert reader.parse(10).frames == 1 and reader.started
    return reader


def test_an_assignment_and_its_request_read_back_the_same(channel: Ends) -> None:
    request = PerformRequest(task="echo", request_id="req-é").SerializeToString()
    task_end, daemon_end = channel
    daemon_end.sendall(ASSIGNMENT.head(len(request)) + request)
    frame = frames.read(task_end.fileno())
    assert frame is not None
    assert Assignment.unpack(frame) == (ASSIGNMENT, request)


def test_an_assignment_of_no_request_and_no_trace_reads_back_the_same() -> None:
    bare = Assignment(Limits(*(NO_LIMIT,) * 6), "", 0.5, "", "")
    head = bare.head(0)
    assert Assignment.unpack(head[frames.FRAME.size:]) == (bare, b"")


@pytest.mark.parametrize("cut", [1, frames.FRAME.size + 10, -1])
def test_an_assignment_cut_short_is_refused(cut: int) -> None:
    """Before, a frame cut within its texts gave shorter texts, silently; within its head, a struct.error."""
    frame = ASSIGNMENT.head(0)[frames.FRAME.size:]
    with pytest.raises(FrameError, match="assignment frame"):
        Assignment.unpack(frame[:cut])


@pytest.mark.parametrize("kind", [PROGRESS, HEARTBEAT, ANSWER, TASK_STARTS, OPTIONS_INVALID])
def test_each_kind_written_reads_back_the_same(channel: Ends, kind: bytes) -> None:
    task_end, daemon_end = channel
    payload = bytes(range(256)) * 3
    frames.write(task_end.fileno(), kind, payload)
    assert frames.read(daemon_end.fileno()) == kind + payload


def test_a_frame_larger_than_the_socket_buffer_is_written_and_read_whole(channel: Ends) -> None:
    task_end, daemon_end = channel
    payload = os.urandom(4 << 20)  # many times a socket's buffer: os.write takes it in parts
    writer = threading.Thread(target=frames.write, args=(task_end.fileno(), ANSWER, payload))
    writer.start()
    try:
        assert frames.read(daemon_end.fileno()) == ANSWER + payload
    finally:
        writer.join()


def test_end_of_file_before_a_frame_is_none(channel: Ends) -> None:
    task_end, daemon_end = channel
    daemon_end.shutdown(socket.SHUT_WR)
    assert frames.read(task_end.fileno()) is None


@pytest.mark.parametrize("sent", [b"\x00\x00", frames.pack(ANSWER, b"an answer")[:-3]],
                         ids=["within the length", "within the payload"])
def test_end_of_file_within_a_frame_is_refused(channel: Ends, sent: bytes) -> None:
    task_end, daemon_end = channel
    daemon_end.sendall(sent)
    daemon_end.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError, match="ended"):
        frames.read(task_end.fileno())


def test_a_frame_above_the_limit_is_refused_unread(channel: Ends) -> None:
    task_end, daemon_end = channel
    task_end.sendall(frames.pack(ANSWER, b"x" * 100))
    with pytest.raises(FrameError, match="a frame of 101 bytes, above the limit of 100"):
        frames.read(daemon_end.fileno(), limit=100)


def test_the_reader_takes_the_channels_frames_in_order() -> None:
    reader = Reader(LIMIT, 1024)
    answer = PerformResponse(outcome=True).SerializeToString()
    reader.feed(b"".join([frames.pack(TASK_STARTS, b"digest"), frames.pack(PROGRESS, b"p1"),
                          frames.pack(HEARTBEAT, b"h1"), frames.pack(PROGRESS, b"p2"), frames.pack(ANSWER, answer),
                          frames.pack(PROGRESS, b"after the answer")]))
    parsed = reader.parse(100)
    assert (parsed.frames, parsed.more, parsed.beats) == (5, False, 3)
    assert (parsed.progress, parsed.heartbeat) == (b"p2", b"h1")  # the last of each
    assert (reader.started, reader.digest, reader.answer) == (True, b"digest", answer)
    assert reader.ended and reader.invalid is None and reader.options_invalid is None
    assert reader.parse(100).frames == 0  # nothing after the answer is taken


def test_the_reader_takes_a_frame_only_once_it_is_whole() -> None:
    reader = started()
    frame = frames.pack(ANSWER, b"the answer")
    for byte in frame[:-1]:
        reader.feed(bytes([byte]))
        assert reader.parse(10).frames == 0
    reader.feed(frame[-1:])
    assert reader.parse(10).frames == 1 and reader.answer == b"the answer"


def test_the_reader_keeps_to_its_budget_and_goes_on_where_it_stopped() -> None:
    reader = started()
    reader.feed(b"".join(frames.pack(PROGRESS, b"%d" % i) for i in range(7)))
    first, second = reader.parse(4), reader.parse(4)
    assert (first.frames, first.more, first.progress) == (4, True, b"3")
    assert (second.frames, second.more, second.progress) == (3, False, b"6")
    assert reader.buffer == b""


def test_a_beat_above_the_beat_limit_is_counted_not_passed_on() -> None:
    reader = started()
    reader.feed(frames.pack(HEARTBEAT, b"h") + frames.pack(PROGRESS, b"p") + frames.pack(PROGRESS, b"x" * 1025))
    parsed = reader.parse(10)
    assert (parsed.beats, parsed.progress, parsed.heartbeat) == (3, None, b"h")


def test_a_frame_above_the_limit_ends_what_the_reader_takes() -> None:
    reader = started()
    reader.feed(frames.pack(PROGRESS, b"p") + frames.pack(ANSWER, b"x" * LIMIT))
    parsed = reader.parse(10)
    assert (parsed.frames, parsed.progress, reader.too_large) == (1, b"p", True)
    assert reader.buffer == b""
    reader.feed(frames.pack(ANSWER, b"late"))
    assert reader.parse(10).frames == 0 and reader.answer is None


def test_the_runners_verdict_that_the_options_are_invalid_ends_the_channel() -> None:
    reader = Reader(LIMIT, 1024)
    reader.feed(frames.pack(OPTIONS_INVALID, "options: bad \xff".encode()) + frames.pack(TASK_STARTS, b""))
    assert reader.parse(10).frames == 1
    assert (reader.options_invalid, reader.started, reader.ended) == ("options: bad \xff", False, True)


@pytest.mark.parametrize(("fed", "why"), [
    (frames.pack(PROGRESS, b""), "first frame on its channel was not the runner's"),
    (frames.pack(ANSWER, b""), "first frame on its channel was not the runner's"),
    (frames.pack(TASK_STARTS, b"") + frames.pack(TASK_STARTS, b""), "('the task starts') after it started"),
    (frames.pack(TASK_STARTS, b"") + frames.pack(OPTIONS_INVALID, b""), "('options invalid') after it started"),
    (frames.pack(TASK_STARTS, b"") + frames.pack(b"Z", b""), "a frame of no known kind"),
    (frames.pack(TASK_STARTS, b"") + frames.FRAME.pack(0), "a frame of no known kind"),  # not even a kind
], ids=["progress first", "answer first", "starts twice", "invalid after start", "unknown kind", "empty frame"])
def test_a_frame_out_of_the_channels_order_makes_it_invalid(fed: bytes, why: str) -> None:
    reader = Reader(LIMIT, 1024)
    reader.feed(fed + frames.pack(ANSWER, b"never taken"))
    reader.parse(10)
    assert reader.invalid is not None and why in reader.invalid
    assert reader.ended and reader.first_came and reader.answer is None


def test_error_response_carries_every_field() -> None:
    response = frames.error_response(TaskError.CRASHED, "Crashed", "it died", "a traceback", exit_code=3, signal=9)
    error = response.error
    assert (error.kind, error.type, error.message, error.traceback) == (TaskError.CRASHED, "Crashed", "it died",
                                                                        "a traceback")
    assert (error.exit_code, error.signal, response.outcome) == (3, 9, False)


def test_the_root_package_and_the_client_load_no_server_module() -> None:
    """The root package (the task API, the frames) and the client are below the server: none of them, nor
    anything they import, reaches into task_runner.server."""
    code = ("import json, pkgutil, sys, importlib\n"
            "import task_runner, task_runner.task, task_runner.frames, task_runner.values, task_runner.client\n"
            "for module in pkgutil.iter_modules(task_runner.client.__path__, 'task_runner.client.'):\n"
            "    importlib.import_module(module.name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd="/").stdout)
    assert "task_runner.client.cli" in loaded and "task_runner.frames" in loaded  # what was meant was loaded
    server = [name for name in loaded if name == "task_runner.server" or name.startswith("task_runner.server.")]
    assert server == [], server

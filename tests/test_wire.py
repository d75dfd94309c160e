"""The wire records between the daemon, the fork server and the task processes (task_runner.server.wire):
each packed then parsed is itself again, and a message cut short or of no known kind is refused."""

from __future__ import annotations

import struct

import pytest

from task_runner import frames
from task_runner.frames import NO_LIMIT, Assignment, Limits
from task_runner.server import wire
from task_runner.server.wire import (
    CHUNK,
    NO_UID,
    Exited,
    Fork,
    ForkFailed,
    Kill,
    Notice,
    Ready,
    Reassembly,
    Released,
    Spare,
    Stop,
    chunks,
    unpack,
)

RECORDS = [
    Fork((Spare(NO_UID, 0), Spare(2_000_001, 3))),
    Fork(()),
    ForkFailed((Spare(2_000_002, 1),)),
    Released((2_000_001, 2_000_002, NO_UID - 1)),
    Released(()),
    Kill(4242, 17, Stop.TIMEOUT),
    Kill(2**32 - 1, 2**32 - 1, Stop.STALLED),
    Notice(4242, 18),
    Ready(4243, 19, 2_000_003, 2, "/sys/fs/cgroup/task-runner/t-4243"),
    Ready(4244, 20, NO_UID, 0, ""),
    Exited(4245, 9, 0.125, 1.5, 65_536, Stop.CANCELLED, True),
    Exited(4246, 3 << 8, 0.0, 0.0, 0, Stop.NONE, False),
]
Refused = (struct.error, ValueError)


@pytest.mark.parametrize("record", RECORDS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(RECORDS)])
def test_each_fork_server_message_parses_back_to_itself(record: wire.Message) -> None:
    parsed = unpack(record.pack())
    assert parsed == record and type(parsed) is type(record)


@pytest.mark.parametrize("record", RECORDS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(RECORDS)])
def test_a_message_cut_short_is_refused(record: wire.Message) -> None:
    packed = record.pack()
    cut = len(packed) - len(record.cgroup) - 1 if isinstance(record, Ready) else len(packed) - 1
    with pytest.raises(Refused):
        unpack(packed[:cut])


def test_a_fixed_size_message_with_bytes_to_spare_is_refused() -> None:
    for record in (Kill(1, 2, Stop.TIMEOUT), Notice(1, 2), Exited(1, 0, 0.0, 0.0, 0, Stop.NONE, False)):
        with pytest.raises(Refused):
            unpack(record.pack() + b"\0")


def test_a_message_of_no_known_kind_or_stop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown message kind"):
        unpack(b"Z" + Notice(1, 2).pack()[1:])
    with pytest.raises(ValueError, match="unknown message kind"):
        unpack(b"")
    with pytest.raises(ValueError):  # a Kill for a reason the daemon has not
        unpack(struct.pack("!cIIB", b"K", 1, 2, max(Stop) + 1))


@pytest.mark.parametrize("assignment", [
    Assignment(Limits(256 << 20, 30, 1024, 64, 1 << 30, 0), "/var/lib/task-runner/w/abc", 12_345.678_9, "req-1",
               "reports", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=opaque"),
    Assignment(Limits(NO_LIMIT, NO_LIMIT, NO_LIMIT, frames.BY_CGROUP, NO_LIMIT, 8 << 20), "", 0.0, "", ""),
    Assignment(Limits(1, 1, 1, 1, 1, 1), "/tmp/é ü", 1e9, "id ✓", "caller-ü"),
], ids=["traced", "unlimited", "unicode"])
def test_an_assignment_frame_parses_back_to_itself_and_its_request(assignment: Assignment) -> None:
    request = b"\x0a\x04echo\x10\x01" * 3
    head = assignment.head(len(request))
    (length,) = frames.FRAME.unpack_from(head)
    frame = head[frames.FRAME.size:] + request
    assert length == len(frame)  # the length covers the head and the request sent after it
    assert Assignment.unpack(frame) == (assignment, request)


def test_an_assignment_frame_cut_short_is_refused() -> None:
    head = Assignment(Limits(1, 1, 1, 1, 1, 1), "/w", 1.0, "r", "c").head(0)[frames.FRAME.size:]
    with pytest.raises(Refused):
        Assignment.unpack(head[:40])
    with pytest.raises(Refused):  # its texts cut inside a character
        Assignment.unpack(Assignment(Limits(1, 1, 1, 1, 1, 1), "é", 1.0, "", "").head(0)[frames.FRAME.size:-1])


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_a_first_message_of_any_size_is_reassembled_from_its_chunks(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packets = chunks(wire.SPEC, payload)
    assert all(len(packet) <= CHUNK + 2 for packet in packets)
    whole = Reassembly(wire.SPEC)
    for packet in packets:
        assert not whole.done
        whole.add(packet)
    assert whole.done and whole.whole == payload


def test_reassembly_refuses_what_is_not_the_rest_of_its_message() -> None:
    first, *_ = chunks(wire.HELLO, bytes(2 * CHUNK))
    for stray in (b"", b"X.", wire.SPEC + b".", wire.HELLO + b"?part"):
        with pytest.raises(ValueError):
            Reassembly(wire.HELLO).add(stray)
    ended = Reassembly(wire.HELLO)
    ended.add(wire.HELLO + b".all")
    with pytest.raises(ValueError):  # nothing comes after the last part
        ended.add(first)

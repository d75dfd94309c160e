"""An execution's events (task_runner.server.events.EventLog): numbered in order, replayed to a late follower
(a gap event for what is gone), the response last and never lost, progress coalesced, output bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from task_runner.frames import HEARTBEAT, PROGRESS
from task_runner.server.events import MAX_EVENTS, OUTPUT_CHUNK, EventLog, Stream, beat_event
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformResponse


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def queued(position: int) -> PerformEvent:
    event = PerformEvent()
    event.queued.position = position
    return event


def progress(stage: str) -> Callable[[], PerformEvent | None]:
    message = PerformEvent.Progress(stage=stage)
    return lambda: beat_event(PROGRESS, message.SerializeToString())


async def collected(log: EventLog) -> list[PerformEvent]:
    return [PerformEvent.FromString(data) async for data in log.follow()]


def test_events_are_numbered_in_order_and_the_response_ends_them() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        for position in (3, 2, 1):
            log.add(queued(position))
        answer = PerformResponse(outcome=True).SerializeToString()
        log.finish(answer)
        log.add(queued(0))  # after the response: nothing
        seen = await collected(log)
        assert [event.sequence for event in seen] == [1, 2, 3, 4]
        assert [event.queued.position for event in seen[:3]] == [3, 2, 1]
        assert seen[-1].WhichOneof("event") == "response" and seen[-1].response.outcome
        assert all(event.time_ms >= 0 for event in seen)
    run(test)


def test_a_follower_gets_each_event_as_it_comes_until_the_response() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        follower = asyncio.ensure_future(collected(log))
        await asyncio.sleep(0)  # one turn of the loop (no wait): it follows from before the first event
        log.add(queued(1))
        await asyncio.sleep(0)
        log.finish(PerformResponse().SerializeToString())
        seen = await follower
        assert [event.WhichOneof("event") for event in seen] == ["queued", "response"]
    run(test)


def test_a_late_follower_is_told_how_many_events_it_missed() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        for position in range(MAX_EVENTS + 10):
            log.add(queued(position))
        log.finish(PerformResponse().SerializeToString())
        seen = await collected(log)
        assert seen[0].WhichOneof("event") == "gap" and seen[0].gap.events_dropped == 11
        assert seen[1].sequence == 12 and seen[-1].WhichOneof("event") == "response"
        assert len(seen) == 1 + MAX_EVENTS
    run(test)


def test_an_ended_log_stops_its_followers_without_a_response() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        log.add(queued(1))
        follower = asyncio.ensure_future(collected(log))
        await asyncio.sleep(0)
        log.end()
        assert [event.WhichOneof("event") for event in await follower] == ["queued"]
    run(test)


def test_progress_is_coalesced_the_latest_wins_and_the_replaced_are_counted() -> None:
    async def test() -> None:
        dropped: list[int] = []
        log = EventLog(asyncio.get_running_loop().time(), dropped.append)
        for stage in "abcd":  # within one interval: the first at once, the last after it
            log.coalesce(PROGRESS.decode(), progress(stage))
        log.coalesce(HEARTBEAT.decode(), lambda: beat_event(HEARTBEAT, b""))  # a key of its own
        log.flush()
        log.finish(PerformResponse().SerializeToString())
        seen = [event for event in await collected(log) if event.WhichOneof("event") == "progress"]
        assert [event.progress.stage for event in seen] == ["a", "d"]
        assert sum(dropped) == 2  # b and c were never sent
    run(test)


def test_a_mangled_progress_frame_is_no_event() -> None:
    assert beat_event(PROGRESS, b"\xff\xff") is None
    event = beat_event(PROGRESS, PerformEvent.Progress(stage="s").SerializeToString())
    assert event is not None and event.progress.stage == "s"


def test_output_is_sent_in_chunks_and_what_exceeds_one_is_counted_not_kept() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        log.output(Stream.STDOUT, b"a" * (OUTPUT_CHUNK - 1))
        log.output(Stream.STDOUT, b"bcd")
        log.output(Stream.STDERR, b"oops")
        log.flush()
        log.output(Stream.STDOUT, b"next")
        log.finish(PerformResponse().SerializeToString())  # flushes what waits
        chunks = [event.output for event in await collected(log) if event.WhichOneof("event") == "output"]
        stdout = [(len(chunk.data), chunk.dropped_bytes) for chunk in chunks if chunk.stream == Stream.STDOUT]
        assert stdout == [(OUTPUT_CHUNK, 2), (4, 0)]
        assert [chunk.data for chunk in chunks if chunk.stream == Stream.STDERR] == [b"oops"]
    run(test)


def test_a_trimmed_log_keeps_its_latest_events_and_the_response() -> None:
    async def test() -> None:
        log = EventLog(asyncio.get_running_loop().time())
        for position in range(100):
            log.add(queued(position))
        log.finish(PerformResponse(outcome=True).SerializeToString())
        log.trim(64)
        assert log.nbytes <= 64
        seen = await collected(log)
        kept = [event.queued.position for event in seen[1:-1]]
        assert kept and kept == list(range(100 - len(kept), 100))  # the latest, in order
        assert seen[0].gap.events_dropped == 100 - len(kept) and seen[-1].response.outcome
    run(test)


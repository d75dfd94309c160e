"""One run's channel (task_runner.server.run.Run): the frames a task process sends, over a real socket pair,
become its answer or the reason it has none. The test plays the task process, and the fork server's part
(a kill is reported back as the process's exit, as the fork server reports a reaped one)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from task_runner.frames import ANSWER, FRAME, HEARTBEAT, OPTIONS_INVALID, PROGRESS, TASK_STARTS
from task_runner.server.config import load
from task_runner.server.events import EventLog
from task_runner.server.forkclient import TaskProcess
from task_runner.server.run import Run
from task_runner.server.wire import NO_UID, Exited, Stop
from task_runner.v1.task_runner_pb2 import PerformEvent, PerformResponse, TaskError

Kind = TaskError.Kind
CONFIG = load(None)
DIGEST = bytes(range(32))
LIMIT = FRAME.size + CONFIG.result_max_bytes + (64 << 10)  # the largest frame a run reads: its answer's bound and more


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(1 + len(payload)) + kind + payload


def answer(**fields: object) -> bytes:
    result = fields.pop("result", None)
    response = PerformResponse(**fields)  # type: ignore[arg-type]
    if result is not None:
        response.result.update(result)
    return frame(ANSWER, response.SerializeToString())


STARTS = frame(TASK_STARTS, DIGEST)


class ForkServer:
    """The fork server's part: a kill ends the process (reported as killed by SIGKILL, for that reason)."""

    def __init__(self) -> None:
        self.kills: list[Stop] = []

    def kill(self, process: TaskProcess, why: Stop) -> None:
        self.kills.append(why)
        if not process.exited.done():
            now = asyncio.get_running_loop().time()
            process.exited.set_result(Exited(process.pid, signal.SIGKILL, 0.0, 0.0, 0, why, False, now))

    def notice(self, process: TaskProcess) -> None:
        raise AssertionError("no test here gives a notice")


class Task:
    """The task process's ends of its channel and pipes, and the run the daemon holds of it."""

    def __init__(self) -> None:
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        (stdout, self.stdout), (stderr, self.stderr) = os.pipe(), os.pipe()
        for fd in (stdout, stderr):
            os.set_blocking(fd, False)
        theirs.setblocking(False)
        self.process = TaskProcess(4242, 1, theirs, stdout, stderr, "", "", NO_UID, 0)
        self.server = ForkServer()
        self.dropped: list[int] = []
        self.events = EventLog(asyncio.get_running_loop().time(), self.dropped.append)
        self.run = Run(self.server, self.process, CONFIG, events=self.events)  # type: ignore[arg-type]

    def exits(self, code: int) -> None:
        """The process ends of itself, unasked, with exit code `code`."""
        self.process.exited.set_result(Exited(self.process.pid, code << 8, 0.01, 0.0, 2048, Stop.NONE, False,
                                                 asyncio.get_running_loop().time()))

    async def execute(self, *frames: bytes) -> PerformResponse:
        """Send `frames` as the task would, then run it to its answer; returns the response."""
        if frames:
            self.channel.sendall(b"".join(frames))
        deadline = asyncio.get_running_loop().time() + 20  # (a test that reaches it fails: none should)
        response, _ = await self.run.execute(b"assignment:", b"request", deadline)
        return response

    def close(self) -> None:
        self.channel.close()
        for fd in (self.stdout, self.stderr):
            os.close(fd)


@contextmanager
def task() -> Iterator[Task]:
    made = Task()
    try:
        yield made
    finally:
        made.close()


async def events(log: EventLog) -> list[PerformEvent]:
    log.finish(b"")
    return [PerformEvent.FromString(data) async for data in log.follow()]


def test_an_answer_after_the_runners_frame_is_the_response_and_the_task_got_its_request() -> None:
    async def test() -> None:
        with task() as t:
            os.write(t.stdout, b"hello\n")
            response = await t.execute(STARTS, answer(outcome=True, result={"n": 1}))
            assert response.outcome and dict(response.result) == {"n": 1} and not response.HasField("error")
            assert response.stdout.tail == b"hello\n"
            assert t.run.values_digest == DIGEST and t.run.options_invalid is None
            assert t.channel.recv(1024) == b"assignment:request"  # handed over as it came
            assert t.server.kills == []
    asyncio.run(test())


def test_of_the_progress_and_heartbeats_read_at_once_only_the_last_of_each_is_passed_on() -> None:
    async def test() -> None:
        with task() as t:
            beats = [frame(PROGRESS, PerformEvent.Progress(stage=f"s{i}").SerializeToString()) for i in range(1000)]
            response = await t.execute(STARTS, *beats, frame(HEARTBEAT), answer(outcome=True))
            assert response.outcome
            seen = await events(t.events)
            stages = [event.progress.stage for event in seen if event.WhichOneof("event") == "progress"]
            assert stages and stages[-1] == "s999" and len(stages) < 20
            assert len(stages) + sum(t.dropped) == 1000  # every one is passed on or counted
            assert any(event.WhichOneof("event") == "heartbeat" for event in seen)
    asyncio.run(test())


def test_invalid_options_are_the_runners_verdict_not_an_answer() -> None:
    async def test() -> None:
        with task() as t:
            response = await t.execute(frame(OPTIONS_INVALID, b"options['x']: nan is not a finite number"))
            assert t.run.options_invalid == "options['x']: nan is not a finite number"
            assert (response.error.kind, response.error.type) == (Kind.KIND_UNSPECIFIED, "InvalidOptions")
    asyncio.run(test())


@pytest.mark.parametrize(("frames", "why"), [
    ((frame(PROGRESS), answer(outcome=True)), "first frame on its channel was not the runner's"),
    ((STARTS, frame(TASK_STARTS, DIGEST), answer(outcome=True)), "the runner's own first frame ('the task starts')"),
    ((STARTS, frame(OPTIONS_INVALID, b"forged")), "the runner's own first frame ('options invalid')"),
    ((STARTS, frame(b"Z", b"?")), "a frame of no known kind"),
    ((FRAME.pack(0),), "first frame on its channel was not the runner's"),  # an empty frame has no kind
], ids=["no-runner-frame", "second-start", "forged-verdict", "unknown-kind", "empty-frame"])
def test_a_channel_out_of_order_is_an_invalid_result(frames: tuple[bytes, ...], why: str) -> None:
    async def test() -> None:
        with task() as t:
            response = await t.execute(*frames)
            assert response.error.kind == Kind.RESULT_INVALID and why in response.error.message
            assert not response.outcome
    asyncio.run(test())


def test_a_frame_above_the_limit_has_the_task_killed_before_it_is_read() -> None:
    async def test() -> None:
        with task() as t:
            response = await t.execute(STARTS, FRAME.pack(LIMIT + 1) + ANSWER)
            assert t.server.kills == [Stop.RESULT_TOO_LARGE]
            assert response.error.kind == Kind.RESULT_TOO_LARGE
    asyncio.run(test())


def test_an_answer_cut_short_by_the_processs_end_is_a_crash_not_an_answer() -> None:
    async def test() -> None:
        with task() as t:
            t.channel.sendall(STARTS + answer(outcome=True, result={"cut": "x" * 100})[:-10])
            t.channel.shutdown(socket.SHUT_WR)  # then its channel's end
            t.exits(0)
            response = await t.execute()
            assert response.error.kind == Kind.CRASHED and not response.outcome
            assert response.error.message == "the task process exited with code 0 without answering"
            assert response.usage.max_rss_kib == 2048  # the fork server's measure
    asyncio.run(test())

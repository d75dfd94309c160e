"""Admission control: a fixed number of running slots and a bounded FIFO queue in front of them."""

from __future__ import annotations

import asyncio
import collections
import contextlib


class QueueFull(Exception):
    """Every slot is busy and the queue is full."""


class Slots:
    """`max_running` slots; up to `max_queued` callers wait for one, first come first served."""

    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running, self.max_queued = max_running, max_queued
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be.

        Raises:
            QueueFull: at once, if the queue is full.
        """
        if self.running < self.max_running and not self._waiters:
            self._take()
            return
        if len(self._waiters) >= self.max_queued:
            raise QueueFull
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the caller left: pass it on
            else:
                # release() may already have popped it (a cancelled waiter is skipped there).
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _take(self) -> None:
        self.running += 1
        self._idle.clear()

    def release(self) -> None:
        """Give a slot back, handing it straight to the first caller still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
        if self.running == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing runs."""
        await self._idle.wait()

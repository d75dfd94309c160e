"""The idempotency window: finished executions' answers, by caller and caller-given request_id, for `window_s`.

What still runs or waits is the registry's (task_runner.server.executions); a retry looks there first.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

from task_runner.server.events import KEPT_BYTES, EventLog
from task_runner.server.executions import Ended, Execution, Key


class Kept(NamedTuple):
    """A finished execution's answer, as little as is needed to give it again."""

    task: str
    options_digest: bytes  # as in Execution
    values_digest: bytes  # its options' values_digest, as its task process gave it (b"": none came)
    answer: bytes
    expires: float
    events: EventLog  # for a Watch after the end
    ended: Ended

    @property
    def nbytes(self) -> int:
        return len(self.answer) + len(self.options_digest) + len(self.values_digest) + self.events.nbytes


class AnswerCache:
    """Finished executions' answers by caller and caller-given request_id, each for `window_s`.

    Bounded by entry count and by the bytes kept; the oldest go first. The executor keeps only an
    answer a retry may have (not a CANCELLED one: the caller went away, and a retry should run the task).
    """

    def __init__(self, window_s: float, max_entries: int, max_bytes: int) -> None:
        self.window_s, self.max_entries, self.max_bytes = window_s, max_entries, max_bytes
        self._kept: collections.OrderedDict[Key, Kept] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: Key, now: float) -> Kept | None:
        while self._kept and next(iter(self._kept.values())).expires <= now:
            self._drop_oldest()
        return self._kept.get(key)

    def find(self, request_id: str, now: float) -> Kept | None:
        """The answer of `request_id` of any caller (for a caller who may see all): a scan."""
        self.get(("", ""), now)  # drop the expired
        return next((kept for (_, rid), kept in self._kept.items() if rid == request_id), None)

    def keep(self, execution: Execution, answer: bytes, now: float) -> None:
        """Keep `execution`'s answer for the window (none is kept without one)."""
        if self.window_s <= 0:
            return
        execution.events.trim(KEPT_BYTES)
        values = execution.run.values_digest if execution.run is not None else b""
        kept = Kept(execution.task, execution.options_digest, values, answer, now + self.window_s,
                    execution.events, execution.ended)
        self._kept[execution.key] = kept
        self._bytes += kept.nbytes
        while self._kept and (len(self._kept) > self.max_entries or self._bytes > self.max_bytes):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, kept = self._kept.popitem(last=False)
        self._bytes -= kept.nbytes

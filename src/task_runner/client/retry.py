"""When and how the clients retry: one policy, used by the blocking and the asyncio client alike.

Transport failures (UNAVAILABLE) and refusals before running (RESOURCE_EXHAUSTED that carries a
google.rpc.RetryInfo: a full queue) are retried always, never sooner than the RetryInfo says,
with exponential backoff and full jitter, under the same request_id: should the daemon have run
the call after all, it answers the retry from its idempotency cache instead of running
the task again. Task failures are retried only when the caller asks (`retries=N`); each such
retry is a new execution, under the request_id suffixed "#retry1", "#retry2", ... An answer
with outcome false is never retried: it is deterministic.

A client of several daemons (a fleet) does not retry a call whose connection was lost once it may
have reached its daemon (`rerun_lost` False, `FLEET_RETRY`): that daemon may have been running it,
and the retry would run it again on another, whose idempotency cache knows nothing of it. The
caller gets UNAVAILABLE and decides. Calls that never reached a daemon, and a daemon's own
refusals (draining), are retried as always.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from task_runner.client.errors import Overloaded, TaskFailed, TaskRunnerError, Unavailable
from task_runner.client.results import TaskResult, read_response
from task_runner.v1.task_runner_pb2 import PerformRequest, PerformResponse


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how soon to try again.

    Args:
        transport_attempts: tries in all for one execution when the daemon is unreachable or full.
        rerun_lost: retry a call whose connection was lost after it may have reached its daemon (the same
            daemon, or a restarted one, answers it from its idempotency cache if it finished; behind a
            balancer another daemon would run it again).
        initial_backoff_s, max_backoff_s, multiplier: the backoff before each retry is drawn
            uniformly from [0, min(max, initial * multiplier**n)] ("full jitter").
    """

    transport_attempts: int = 5
    rerun_lost: bool = True  # retry an UNAVAILABLE that may have reached a daemon (Unavailable.may_have_run)
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoffs(self) -> Iterator[float]:
        ceiling = self.initial_backoff_s
        while True:
            yield random.uniform(0, ceiling)
            ceiling = min(self.max_backoff_s, ceiling * self.multiplier)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(transport_attempts=1)
FLEET_RETRY = RetryPolicy(rerun_lost=False)  # a client of several daemons, by default


class Attempts:
    """The attempts of one call: which request_id each uses, and whether an error gets another try."""

    def __init__(self, policy: RetryPolicy, task_retries: int, request_id: str | None) -> None:
        self._policy = policy
        self._task_retries = task_retries
        self._base_id = request_id or uuid.uuid4().hex
        self._task_attempt = 0
        self._transport_attempt = 1
        self._backoffs = policy.backoffs()

    @property
    def request_id(self) -> str:
        return self._base_id if self._task_attempt == 0 else f"{self._base_id}#retry{self._task_attempt}"

    def next_delay(self, error: TaskRunnerError) -> float | None:
        """The pause before the next attempt, or None if `error` is final."""
        # RESOURCE_EXHAUSTED is retried when the daemon says when to (a full queue: RetryInfo in the
        # status details), not when the request is too large; and never sooner than it says.
        hint = error.retry_delay_s if isinstance(error, Unavailable | Overloaded) else None
        refused = isinstance(error, Unavailable) or hint is not None
        if isinstance(error, Unavailable) and error.may_have_run and not self._policy.rerun_lost:
            refused = False
        if refused and self._transport_attempt < self._policy.transport_attempts:
            self._transport_attempt += 1
            return max(next(self._backoffs), hint or 0.0)
        if isinstance(error, TaskFailed) and error.retryable and self._task_attempt < self._task_retries:
            self._task_attempt += 1
            self._transport_attempt = 1
            return next(self._backoffs)
        return None


#: What the call core asks of its driver: send this request (answer with the response or the
#: error it got), or wait this many seconds (answer with None).
Step = PerformRequest | float
Plan = Generator[Step, PerformResponse | TaskRunnerError | None, TaskResult]


def plan(request: PerformRequest, policy: RetryPolicy, task_retries: int, request_id: str | None) -> Plan:
    """One call, with its retries, as steps for a driver to carry out: the one call core that the
    blocking, asyncio and callback forms share (each only sends and waits in its own way).

    Returns (as the generator's value) the answer. Raises the final TaskRunnerError.
    """
    attempts = Attempts(policy, task_retries, request_id)
    while True:
        request.request_id = attempts.request_id
        got = yield request
        try:
            if isinstance(got, TaskRunnerError):
                raise got
            assert got is not None
            return read_response(got)
        except TaskRunnerError as exc:
            delay = attempts.next_delay(exc)
            if delay is None:
                raise
        yield delay

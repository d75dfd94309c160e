"""The one record of task uids on each side, alone (no daemon): the fork server's ledger of each uid's life there
(task_runner.server.forkserver.uidledger), and the daemon's pool of which uids are out, and to whom
(task_runner.server.uids).
"""

from __future__ import annotations

import pytest

from task_runner.server.forkserver.uidledger import (
    GIVEN,
    REAPED,
    SWEEP_BACKOFF_S,
    SWEEP_DUE,
    SWEEPING,
    SWEEPS_AT_ONCE,
    UidLedger,
    UidStateError,
)
from task_runner.server.uids import UidError, UidPool

UID = 0x7000_0000
NOW = 1000.0


def left_after_reaping(ledger: UidLedger, uid: int = UID, pid: int = 10) -> None:
    """`uid` given to `pid`, its process reaped, something of it left: due for the sweeper."""
    ledger.give(uid, pid)
    assert ledger.reaped(pid) == uid
    ledger.sweep(uid)


def test_a_uid_is_never_given_twice_while_the_fork_server_has_it() -> None:
    ledger = UidLedger()
    ledger.give(UID, 10)
    steps = [lambda: ledger.reaped(10), lambda: ledger.sweep(UID), lambda: ledger.asked(UID),
             lambda: ledger.swept(UID, False, NOW), lambda: ledger.asked(UID)]
    for step in [lambda: None, *steps]:
        step()
        with pytest.raises(UidStateError):
            ledger.give(UID, 11)
    assert ledger.swept(UID, True, NOW)
    ledger.give(UID, 11)  # released: the daemon may send it again
    assert ledger.state(UID) == GIVEN


def test_a_task_process_has_one_uid() -> None:
    ledger = UidLedger()
    ledger.give(UID, 10)
    with pytest.raises(UidStateError):
        ledger.give(UID + 1, 10)
    assert UID + 1 not in ledger


def test_a_uid_is_not_released_while_its_process_lives() -> None:
    ledger = UidLedger()
    ledger.give(UID, 10)
    with pytest.raises(UidStateError):
        ledger.release(UID)
    with pytest.raises(UidStateError):
        ledger.sweep(UID)  # nor swept: its process may still make more
    assert ledger.state(UID) == GIVEN
    assert ledger.reaped(10) == UID
    ledger.release(UID)  # nothing of its tree was left
    assert UID not in ledger and len(ledger) == 0


def test_a_uid_with_something_left_is_released_only_by_the_sweeper_saying_clean() -> None:
    ledger = UidLedger()
    left_after_reaping(ledger)
    with pytest.raises(UidStateError):
        ledger.release(UID)
    assert ledger.due(NOW) == [UID]
    ledger.asked(UID)
    with pytest.raises(UidStateError):
        ledger.release(UID)
    assert not ledger.swept(UID, False, NOW)
    assert ledger.state(UID) == SWEEP_DUE
    with pytest.raises(UidStateError):
        ledger.release(UID)
    ledger.asked(UID)
    assert ledger.swept(UID, True, NOW)
    assert ledger.state(UID) is None


def test_the_sweeper_is_asked_once_at_a_time_and_answers_only_what_it_was_asked() -> None:
    ledger = UidLedger()
    left_after_reaping(ledger)
    with pytest.raises(UidStateError):
        ledger.swept(UID, True, NOW)  # not asked yet
    ledger.asked(UID)
    assert ledger.state(UID) == SWEEPING
    assert ledger.due(NOW) == []  # no second ask before its answer
    with pytest.raises(UidStateError):
        ledger.asked(UID)
    with pytest.raises(UidStateError):
        ledger.swept(UID + 1, True, NOW)


def test_a_uid_left_again_is_swept_back_to_back_then_at_growing_intervals() -> None:
    ledger = UidLedger()
    left_after_reaping(ledger)
    now = NOW
    for _ in range(1 + SWEEPS_AT_ONCE):  # the first ask, then as many again at once
        assert ledger.due(now) == [UID]
        assert ledger.sweep_at is None
        ledger.asked(UID)
        ledger.swept(UID, False, now)
    pauses = []
    for _ in range(10):
        assert ledger.due(now) == []
        assert ledger.sweep_at is not None
        pauses.append(ledger.sweep_at - now)
        now = ledger.sweep_at
        assert ledger.due(now) == [UID]
        ledger.asked(UID)
        ledger.swept(UID, False, now)
    first, longest = SWEEP_BACKOFF_S
    assert pauses == pytest.approx([min(longest, first * 2 ** n) for n in range(10)])
    assert pauses[-1] == pytest.approx(longest)


def test_due_names_each_uid_due_now_and_when_the_next_is() -> None:
    ledger = UidLedger()
    late, soon, now_due, live, reaped = range(UID, UID + 5)
    for uid in (late, soon):
        left_after_reaping(ledger, uid, uid)
        for _ in range(SWEEPS_AT_ONCE + (3 if uid == late else 2)):
            ledger.due(NOW)
            ledger.asked(uid)
            ledger.swept(uid, False, NOW)
    left_after_reaping(ledger, now_due, now_due)
    ledger.give(live, live)
    ledger.give(reaped, reaped)
    ledger.reaped(reaped)  # its pid namespace is ending: not the sweeper's
    assert ledger.due(NOW) == [now_due]
    assert ledger.sweep_at == NOW + 2 * SWEEP_BACKOFF_S[0]  # `soon`'s, not `late`'s
    assert ledger.due(NOW + 4 * SWEEP_BACKOFF_S[0]) == [late, soon, now_due]
    assert ledger.sweep_at is None
    assert [ledger.state(uid) for uid in (live, reaped)] == [GIVEN, REAPED]


def test_a_process_without_a_uid_of_its_own_reaps_to_none() -> None:
    ledger = UidLedger()
    ledger.give(UID, 10)
    assert ledger.reaped(11) is None
    assert ledger.reaped(10) == UID
    assert ledger.reaped(10) is None  # once


def test_the_pool_never_hands_out_a_uid_that_is_out() -> None:
    pool, holder = UidPool(UID, UID + 3, -1), object()
    taken = [pool.take(holder) for _ in range(len(pool))]
    assert sorted(taken) == list(range(UID, UID + 4))
    with pytest.raises(UidError, match="are in use"):
        pool.take(holder)
    assert pool.held_by(holder) == set(taken)


def test_released_uids_come_back_round_robin() -> None:
    pool, holder = UidPool(UID, UID + 3, -1), object()
    first, second = pool.take(holder), pool.take(holder)
    pool.give_back(second, holder)
    pool.give_back(first, holder)
    # Every other free uid serves before one just given back: last in, last out.
    assert [pool.take(holder) for _ in range(4)] == [UID + 2, UID + 3, second, first]


def test_a_uid_comes_back_only_from_the_fork_server_that_has_it() -> None:
    pool, old, new = UidPool(UID, UID + 1, -1), object(), object()
    mine = pool.take(old)
    theirs = pool.take(new)
    pool.give_back(mine, new)  # a uid of another generation's fork server: not new's to give back
    pool.give_back(theirs + 100, new)  # nor one never out
    assert pool.held_by(old) == {mine} and pool.held_by(new) == {theirs}
    with pytest.raises(UidError):
        pool.take(new)
    pool.give_back(mine, old)
    pool.give_back(mine, old)  # twice is once: the uid is not free twice
    assert pool.held_by(old) == set()
    assert pool.take(new) == mine
    with pytest.raises(UidError):
        pool.take(new)

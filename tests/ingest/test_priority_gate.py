"""The priority gate on its own, with real threads: a lower lane never starts a write
while a higher one has a batch pending, lanes of one rank never wait for each other,
a lower lane's batches are capped while a higher one has work, and a stopping process
is never held."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.priority import PriorityGate, Turn

STOP = threading.Event()  # never set: the gate's wait is only interrupted by progress


def _write(gate: PriorityGate, lane: str, rank: int, rows: int, hold: threading.Event) -> None:
    queued = gate.queued(rank)
    with gate.turn(lane, rank, rows, queued, STOP):
        hold.wait(10)


def _overlaps(low: Turn, high: Turn) -> bool:
    """The lower turn started while the higher batch was pending (and had not waited
    its longest)."""
    return high.queued <= low.started < high.ended and low.started - low.asked < 1.0


def test_a_lower_lane_waits_for_a_pending_higher_batch_and_then_runs() -> None:
    gate = PriorityGate(yield_rows=100, record=True)
    release_high = threading.Event()
    high = threading.Thread(target=_write, args=(gate, "payments", 0, 10, release_high))
    high.start()
    while not gate.higher_pending(3):  # until the critical batch is pending
        time.sleep(0.001)
    low_done = threading.Event()
    low = threading.Thread(target=_write, args=(gate, "logs", 3, 50, low_done))
    low_done.set()
    low.start()
    low.join(0.3)
    assert low.is_alive(), "the low lane wrote while the critical batch was pending"
    release_high.set()
    high.join(5)
    low.join(5)
    assert not low.is_alive()
    assert gate.turns is not None
    by_lane = {t.lane: t for t in gate.turns}
    assert by_lane["logs"].started >= by_lane["payments"].ended


def test_a_lower_lane_waits_its_longest_and_then_writes_anyway() -> None:
    """A higher lane forever behind (here: a batch that never ends) slows a lower lane
    down to one write per max_wait_s; it never starves it."""
    gate = PriorityGate(yield_rows=100, max_wait_s=0.05, record=True)
    gate.queued(0)
    for _ in range(3):
        with gate.turn("logs", 3, 10, gate.queued(3), STOP):
            pass
    assert gate.turns is not None and len(gate.turns) == 3
    assert all(t.started - t.asked >= 0.05 for t in gate.turns)


def test_lanes_of_one_rank_never_wait_for_each_other() -> None:
    gate = PriorityGate(yield_rows=100, record=True)
    hold = threading.Event()
    first = threading.Thread(target=_write, args=(gate, "olap/payments", 0, 10, hold))
    first.start()
    while not gate.higher_pending(1):
        time.sleep(0.001)
    second_done = threading.Event()
    second_done.set()
    _write(gate, "search/payments", 0, 10, second_done)  # returns although the first holds
    hold.set()
    first.join(5)


def test_a_stopping_process_is_never_held() -> None:
    gate = PriorityGate(yield_rows=100)
    gate.queued(0)  # a critical batch that never gets written
    stop = threading.Event()
    stop.set()
    with gate.turn("logs", 3, 10, gate.queued(3), stop):
        pass


def test_lower_batches_are_capped_while_a_higher_lane_is_served() -> None:
    gate = PriorityGate(yield_rows=200)
    gate.join(3)
    assert gate.batch_rows(3, 5000) == 5000  # alone
    gate.join(0)
    assert gate.batch_rows(3, 5000) == 200  # beside payments, busy or not
    assert gate.batch_rows(3, 150) == 150  # never more than the lane's own limit
    assert gate.batch_rows(0, 5000) == 5000  # nobody is above critical
    gate.join(3)
    assert gate.batch_rows(3, 5000) == 200
    gate.leave(0)
    assert gate.batch_rows(3, 5000) == 5000


def test_a_dropped_batch_releases_the_lower_lanes() -> None:
    gate = PriorityGate(yield_rows=200)
    gate.queued(1)
    assert gate.higher_pending(2)
    gate.dropped(1)
    assert not gate.higher_pending(2)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3)),  # (rank, ms held), per write
        min_size=2,
        max_size=14,
    )
)
def test_no_write_starts_while_a_higher_batch_is_pending(writes: list[tuple[int, int]]) -> None:
    gate = PriorityGate(yield_rows=10, record=True)
    threads = []
    for i, (rank, hold_ms) in enumerate(writes):
        done = threading.Event()
        threading.Timer(hold_ms / 1000, done.set).start()
        thread = threading.Thread(target=_write, args=(gate, f"lane{i}", rank, 1, done))
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join(10)
    assert gate.turns is not None and len(gate.turns) == len(writes)
    for low in gate.turns:
        for high in gate.turns:
            if high.rank < low.rank:
                assert not _overlaps(low, high), (low, high)

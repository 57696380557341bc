"""Priority between the datasources one ``tally ingest`` process serves.

Every lane (a datasource's sink) decodes and writes on its own worker thread, and the
lanes of a process share its cores and interpreter. Under a backlog — a surge of access
logs, say — a low-priority lane would otherwise take its share and more (its batches
grow with its backlog), and a critical datasource's freshness would suffer for it.

The gate shared by a process's lanes does two things:

* **Turns.** A lane's write waits while a lane of *higher* priority has a batch queued
  or being written — but never longer than ``max_wait_s``; a lane never waits for one
  of lower priority. Lanes of the same priority do not wait for each other. A lower
  lane runs in the gaps of the higher ones, which at their steady rate is most of the
  time; while a higher lane is itself behind (a backlog, a loaded machine) it still
  gets one capped write per ``max_wait_s``, so it slows down but never starves (the
  settlements, high, beside payments, critical, in a demo on a busy machine did).
* **Small batches.** A lane's batches are capped to ``yield_rows`` while the process
  serves a lane of higher priority, busy or not: the write a critical batch may find in
  progress when it arrives is always a small one, also after a quiet spell (a cap that
  waited for the higher lane to be busy would let a lower batch grow meanwhile). A
  datasource that needs large batches under a surge runs in a process of its own.

So a critical batch waits for nothing but its own lane, and shares the machine with
at most one capped write per lower lane at a time, and only with the ones that had
started before it arrived or had waited ``max_wait_s``: that is the bound on how much a
lower-priority surge can delay it (measured in ``bench/ledger.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tally.specs import Priority

RANKS: dict[Priority, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}


@dataclass(frozen=True)
class Turn:
    """One write: the lane's rank, its rows, and (monotonic s) when it was handed over,
    asked for its turn, started and ended (kept only when the gate records)."""

    lane: str
    rank: int
    rows: int
    queued: float
    asked: float
    started: float
    ended: float


class PriorityGate:
    def __init__(self, yield_rows: int, max_wait_s: float = 1.0, record: bool = False) -> None:
        self.yield_rows = yield_rows
        self.max_wait_s = max_wait_s
        self.turns: list[Turn] | None = [] if record else None
        self._cond = threading.Condition()
        self._pending: Counter[int] = Counter()  # rank → batches queued or being written
        self._ranks: Counter[int] = Counter()  # rank → lanes served

    def join(self, rank: int) -> None:
        """A lane of ``rank`` is served by this process (until it leaves)."""
        with self._cond:
            self._ranks[rank] += 1

    def leave(self, rank: int) -> None:
        with self._cond:
            self._ranks[rank] -= 1

    def queued(self, rank: int) -> float:
        """A lane of ``rank`` handed a batch to its worker: lower lanes wait from now."""
        with self._cond:
            self._pending[rank] += 1
            return time.monotonic()

    def dropped(self, rank: int) -> None:
        """A queued batch will not be written (stopping, or fenced)."""
        with self._cond:
            self._pending[rank] -= 1
            self._cond.notify_all()

    @contextmanager
    def turn(
        self, lane: str, rank: int, rows: int, queued: float, stop: threading.Event
    ) -> Iterator[None]:
        """Write a batch queued by :meth:`queued`: first wait while a higher rank has a
        batch pending, at most ``max_wait_s`` (a stopping process is never held)."""
        with self._cond:
            asked = time.monotonic()
            deadline = asked + self.max_wait_s
            while self.higher_pending(rank) and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
            started = time.monotonic()  # under the lock: nothing higher pending, or aged
        try:
            yield
        finally:
            with self._cond:
                ended = time.monotonic()
                self._pending[rank] -= 1
                if self.turns is not None:
                    self.turns.append(Turn(lane, rank, rows, queued, asked, started, ended))
                self._cond.notify_all()

    def batch_rows(self, rank: int, default: int) -> int:
        """How many rows a lane of ``rank`` may put in its next batch."""
        with self._cond:
            above = any(n > 0 for r, n in self._ranks.items() if r < rank)
        return min(default, self.yield_rows) if above else default

    def higher_pending(self, rank: int) -> bool:
        """Whether a lane above ``rank`` (a smaller number) has a batch queued or being
        written."""
        with self._cond:
            return any(n > 0 for r, n in self._pending.items() if r < rank)

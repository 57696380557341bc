"""Pause Python's cyclic garbage collector over a commit's allocation burst.

A 10k-row commit allocates a few hundred thousand short-lived tuples and lists (the
key index's entries among them). Each 700 allocations trigger a young collection, and
every few of those an older one, so the collector runs hundreds of times per commit
and, as the million-entry key index ages into the oldest generation, its full passes
grow with the store: measured on this machine, 15% of commit time at 5M keys. None of
these objects form cycles (refcounting frees them), so the collector is paused for
the burst and one young collection afterwards untracks the survivors in one pass.

Pauses nest and are shared across threads: the collector resumes only when the last
pause ends, and only if it was enabled when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            resume = _depth == 0 and _was_enabled
            if resume:
                gc.enable()
        if resume:
            gc.collect(0)

"""A reader in another process never sees half a commit, a missing row or an error.

This process commits a fixed number of deterministic batches (new payments,
cancellations into old partitions, partition and tenant moves, redeliveries,
equal-version twins: every commit touches several base partitions and two rollup
month partitions) and compacts and collects garbage between them. A reader
subprocess (``crash_worker.py read``) queries in a loop; each observation is ONE SQL
statement over the merged view and both rollup views, so it comes from one snapshot.

An observation is correct only if it equals, exactly, the reference fingerprint of
"batches 0 .. n-1" for some n — counts, sums, versions, group counts, the highest
batch whose keys are visible — and every rollup group agrees with the base view
recomputed in the same statement. Between observations n and the generation never
go back, so a key once seen never disappears.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from storage.embedded.store import EmbeddedStore
from tally.specs import SpecRegistry
from tests.storage.crash_worker import (
    FINGERPRINT_COLUMNS,
    Proc,
    commit_batch,
    compaction_round,
    expected_fingerprint,
    make_settings,
)

BATCHES = 40
CHECKPOINTS = (9, 19, 29)  # after these commits, wait until the reader has seen them
GC_GRACE_S = 2.0  # far longer than one observation query (tens of milliseconds)


def _generation(store: EmbeddedStore) -> int:
    with store.core.catalog.read():
        return store.core.catalog.generation()


def _shows_generation(target: int, line: str) -> bool:
    """An observation line of generation ``target`` or later."""
    return line.startswith("{") and json.loads(line).get("gen", -1) >= target


def _describe(fp: tuple[int, ...], expected: dict[tuple[int, ...], int]) -> str:
    """Which columns differ from the nearest valid state (same number of keys)."""
    nearest = min(expected, key=lambda e: abs(e[1] - fp[1]))
    diff = {
        name: (got, want)
        for name, got, want in zip(FINGERPRINT_COLUMNS, fp, nearest, strict=True)
        if got != want
    }
    return f"closest to {expected[nearest]} batches; differs in {diff}"


@pytest.mark.slow
def test_reader_process_sees_only_whole_commits_while_writer_commits_and_compacts(
    tmp_path: Path, registry: SpecRegistry
) -> None:
    spec = registry.get("payments")
    expected = {expected_fingerprint(spec, n): n for n in range(BATCHES + 1)}
    assert len(expected) == BATCHES + 1  # every prefix is distinguishable

    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, gc_grace_s=GC_GRACE_S, orphan_grace_s=3600.0)
    store = EmbeddedStore(settings, registry)  # creates the catalog
    stop = tmp_path / "stop"
    reader = Proc("read", data_dir, "--stop-file", str(stop), stderr_path=tmp_path / "reader.err")
    gc_removed = 0
    try:
        reader.wait_for(lambda line: line == "READY")
        for i in range(BATCHES):
            commit_batch(store, i)
            if i % 2:
                compaction_round(store, i // 2)
                gc_removed += store.compactor.collect_garbage()
            if i in CHECKPOINTS:
                # Let the reader catch up once in a while, so it provably observes
                # several generations however the scheduler treats the two processes.
                reader.wait_for(partial(_shows_generation, _generation(store)))
        final_generation = _generation(store)
        stop.touch()
        reader.wait_for(lambda line: line == "END")
        assert reader.popen.wait(timeout=60) == 0, reader.stderr()
        lines = reader.rest()
    finally:
        reader.close()
        store.close()

    observations: list[dict[str, Any]] = [json.loads(ln) for ln in lines if ln.startswith("{")]
    errors = [o["error"] for o in observations if "error" in o]
    assert not errors, f"{len(errors)} reader errors, first: {errors[0]}"

    violations = []
    seen: list[tuple[int, int]] = []  # (generation, batches visible)
    by_generation: dict[int, tuple[int, ...]] = {}
    for o in observations:
        fp = tuple(o["fp"])
        if fp not in expected:
            violations.append(f"generation {o['gen']}: {_describe(fp, expected)}")
            continue
        seen.append((o["gen"], expected[fp]))
        if by_generation.setdefault(o["gen"], fp) != fp:
            violations.append(f"generation {o['gen']} showed two different states")
    assert not violations, f"{len(violations)} bad observations, e.g. {violations[:3]}"

    # Nothing ever goes back: no key disappears, no generation is un-seen.
    visible = [n for _, n in seen]
    assert visible == sorted(visible), "rows disappeared: the reader went back in time"
    assert seen == sorted(seen), "the reader saw an older generation again"
    # The last observation started after the last commit and shows all of it.
    assert seen[-1] == (final_generation, BATCHES)
    # Not vacuous: many observations over many distinct states.
    generations = {g for g, _ in seen}
    states = {n for _, n in seen}
    assert len(observations) >= 20
    assert len(generations) >= 5 and len(states) >= 5, (generations, states)
    # The writer really compacted and replaced files while the reader was reading.
    assert final_generation > BATCHES
    print(
        f"{len(observations)} observations, {len(generations)} generations, "
        f"{len(states)} states, {gc_removed} files collected, "
        f"max query {max(o['ms'] for o in observations):.0f} ms"
    )

"""Crash safety: a writer process SIGKILLed inside commits, compactions and GC.

A real subprocess (``tests/storage/crash_worker.py``) commits deterministic batches
(new payments, cancellations into old partitions, partition and tenant moves,
redeliveries, equal-version twins) with offsets ``i*N .. (i+1)*N`` and compacts and
collects garbage after every commit, printing a line after each durable step. The
test kills it with SIGKILL — at random delays after it announces a commit or a
compaction, and at exact points inside them — then, in a fresh store and reader,
checks that the store is exactly "batches 0 .. k-1", that garbage collection leaves
precisely the live files, and that the next batch commits exactly once.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from tally.errors import OffsetMismatch
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.factories import latest_by_key
from tests.storage.crash_worker import (
    ROWS_PER_BATCH,
    TP,
    Proc,
    batch_rows,
    commit_batch,
    expected_merged,
    expected_rollup,
    make_settings,
    merged_rows,
    rollup_rows,
    rows_upto,
)

pytestmark = pytest.mark.slow

ROLLUPS = ("payments_hourly", "payments_daily")


# --- harness ----------------------------------------------------------------------------


class Workers:
    """Starts writer subprocesses and makes sure none outlives the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Proc] = []

    def writer(self, data_dir: Path, *args: str) -> Proc:
        proc = Proc(
            "write", data_dir, *args, stderr_path=self.root / f"worker-{len(self.started)}.err"
        )
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.close()


@dataclass(frozen=True)
class Killed:
    """What the worker had said when it died."""

    acked_end: int  # end offset of the last commit it reported as done
    inflight_end: int | None  # end offset of a commit it had begun but not reported
    last_line: str

    @classmethod
    def parse(cls, lines: list[str], start_batch: int) -> Killed:
        acked = start_batch * ROWS_PER_BATCH
        inflight: int | None = None
        for line in lines:
            word, *rest = line.split()
            if word == "COMMIT_BEGIN":
                inflight = (int(rest[0]) + 1) * ROWS_PER_BATCH
            elif word == "COMMIT_DONE":
                assert int(rest[1]) == inflight
                acked, inflight = int(rest[1]), None
        return cls(acked, inflight, lines[-1])

    @property
    def in_commit(self) -> bool:
        return self.inflight_end is not None

    @property
    def in_compaction(self) -> bool:
        return self.last_line.startswith("COMPACT_BEGIN")


@dataclass(frozen=True)
class Recovery:
    batches: int  # batches the recovered store holds
    orphans: int  # parquet files the catalog did not know about
    missing_replaced: int  # replaced (not live) segments whose file was already gone


def parquet_files(settings: Settings) -> set[str]:
    return {str(p) for p in settings.segments_dir.rglob("*.parquet")}


def assert_store_holds(
    store: EmbeddedStore, reader: EmbeddedReader, spec: DatasourceSpec, batches: int
) -> None:
    """Merged view and every rollup equal the reference over batches 0 .. batches-1,
    and the catalog's row counts agree with what the files hold."""
    latest = latest_by_key(spec, rows_upto(batches))
    assert merged_rows(reader, spec) == expected_merged(spec, latest)
    for name in ROLLUPS:
        assert rollup_rows(reader, spec, name) == expected_rollup(spec, name, latest), name
    for name in ("payments", *ROLLUPS):
        in_files = reader.query(f"SELECT count(*) FROM raw.{name}").rows[0][0]
        assert in_files == sum(s.rows for s in store.live_segments(name)), name


def recover_and_verify(
    data_dir: Path, registry: SpecRegistry, killed: Killed, *, expect_durable: bool | None = None
) -> Recovery:
    """Open the store afresh after a kill; check it; GC; commit the next batch once."""
    spec = registry.get("payments")
    settings = make_settings(data_dir, gc_grace_s=0.0, orphan_grace_s=3600.0)
    store = EmbeddedStore(settings, registry)
    reader = EmbeddedReader(settings, registry)
    try:
        # The offset is exactly the end of a whole commit: the last acknowledged one,
        # or the one in flight if its transaction committed before the kill.
        offsets = store.stored_offsets("payments")
        assert set(offsets) <= {TP}
        stored = offsets.get(TP, 0)
        allowed = {killed.acked_end}
        if killed.inflight_end is not None:
            allowed.add(killed.inflight_end)
        assert stored in allowed, f"stored offset {stored}, expected one of {allowed}"
        if expect_durable is not None:
            assert stored == (killed.inflight_end if expect_durable else killed.acked_end)
        batches = stored // ROWS_PER_BATCH

        with store.core.catalog.read():
            known = store.core.catalog.all_paths()
        live = {s.path for s in store.live_segments()}
        missing_live = sorted(p for p in live if not Path(p).exists())
        assert not missing_live, f"live segments without a file: {missing_live}"
        missing_replaced = sum(1 for p in known - live if not Path(p).exists())
        orphans = parquet_files(settings) - known

        assert_store_holds(store, reader, spec, batches)

        # GC removes crash leftovers (and replaced files, grace 0 here) and nothing live.
        removed = store.compactor.collect_garbage(orphan_grace_s=0)
        assert removed >= len(orphans)
        assert not any(Path(p).exists() for p in orphans)
        live = {s.path for s in store.live_segments()}
        with store.core.catalog.read():
            assert store.core.catalog.all_paths() == live
        assert parquet_files(settings) == live
        assert_store_holds(store, reader, spec, batches)

        # A writer started afresh rebuilt its key index from the segments: replaying
        # the last committed batch (without offsets) is a no-op.
        if batches:
            replay = store.commit("payments", batch_rows(batches - 1))
            assert (replay.rows_written, replay.segments) == (0, 0)

        # The next batch, from the stored offset, commits exactly once.
        result = commit_batch(store, batches)
        assert result.segments > 0
        assert store.stored_offsets("payments") == {TP: (batches + 1) * ROWS_PER_BATCH}
        files = parquet_files(settings)
        with pytest.raises(OffsetMismatch):
            commit_batch(store, batches)
        assert parquet_files(settings) == files
        assert store.stored_offsets("payments") == {TP: (batches + 1) * ROWS_PER_BATCH}
        assert_store_holds(store, reader, spec, batches + 1)
        return Recovery(batches + 1, len(orphans), missing_replaced)
    finally:
        reader.close()
        store.close()


def start_writer(workers: Workers, data_dir: Path, expect_batch: int, *args: str) -> Proc:
    proc = workers.writer(data_dir, *args)
    assert proc.wait_for(lambda line: line.startswith("READY")) == f"READY {expect_batch}"
    return proc


# --- random kills -------------------------------------------------------------------------


def _random_kills(
    workers: Workers,
    registry: SpecRegistry,
    data_dir: Path,
    seed: int,
    kills: int,
    trigger: str,
    done: str,
    max_nth: int,
) -> list[tuple[Killed, Recovery]]:
    """``kills`` times: start a writer, wait for its n-th ``trigger`` line (n random),
    wait a random fraction of how long that step typically takes, SIGKILL, verify.

    Step durations come from the workers' own ``done`` lines, kept apart for the first
    step of a worker (it loads the key index or warms DuckDB up) and the later ones."""
    rng = random.Random(seed)
    durations_ms: dict[bool, list[float]] = {True: [], False: []}  # first step? → ms
    batch = 0
    outcomes = []
    for _ in range(kills):
        proc = start_writer(workers, data_dir, batch)
        nth = rng.randint(1, max_nth)
        proc.wait_for_nth(trigger, nth)
        seen = durations_ms[nth == 1]
        typical = statistics.median(seen) if seen else 10.0
        time.sleep(rng.uniform(0.0, typical) / 1000)  # where the kill lands
        lines = proc.sigkill()
        steps = [float(line.split()[-1]) for line in lines if line.startswith(done)]
        durations_ms[True] += steps[:1]
        durations_ms[False] += steps[1:]
        killed = Killed.parse(lines, batch)
        recovery = recover_and_verify(data_dir, registry, killed)
        outcomes.append((killed, recovery))
        batch = recovery.batches
    return outcomes


def test_sigkill_at_random_moments_during_commits(
    workers: Workers, registry: SpecRegistry, tmp_path: Path
) -> None:
    outcomes = _random_kills(
        workers,
        registry,
        tmp_path / "data",
        seed=20260101,
        kills=12,
        trigger="COMMIT_BEGIN",
        done="COMMIT_DONE",
        max_nth=3,
    )
    # Most kills really landed inside a commit (the rest just after it).
    assert sum(k.in_commit for k, _ in outcomes) >= 6, outcomes


def test_sigkill_at_random_moments_during_compactions(
    workers: Workers, registry: SpecRegistry, tmp_path: Path
) -> None:
    outcomes = _random_kills(
        workers,
        registry,
        tmp_path / "data",
        seed=7,
        kills=10,
        trigger="COMPACT_BEGIN",
        done="COMPACT_DONE",
        max_nth=6,
    )
    assert sum(k.in_compaction for k, _ in outcomes) >= 5, outcomes


# --- kills at exact points ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("commit:files_written", 3),  # segments fsynced, catalog transaction open
        ("commit:catalog_updated", 3),  # all inserted, write lock held, not committed
        ("commit:catalog_committed", 3),  # committed, key index not yet updated
        ("commit:returned", 3),  # committed, not yet acknowledged
        ("compact:files_written", 3),  # compacted segment written, not swapped in
        ("compact:catalog_updated", 3),  # swap done inside the transaction, not committed
        ("compact:catalog_committed", 3),  # swapped in, replaced files still on disk
        ("compact:returned", 3),  # returned, not yet acknowledged
        ("gc:removing", 2),  # replaced rows forgotten, their files not yet removed
    ],
)
def test_sigkill_at_a_chosen_point(
    workers: Workers, registry: SpecRegistry, tmp_path: Path, point: str, nth: int
) -> None:
    data_dir = tmp_path / "data"
    proc = start_writer(workers, data_dir, 0, "--pause-at", point, "--pause-nth", str(nth))
    proc.wait_for(lambda line: line.startswith("PAUSED"))
    killed = Killed.parse(proc.sigkill(), 0)
    assert killed.last_line == f"PAUSED {point}"
    phase, where = point.split(":")
    assert killed.in_commit == (phase == "commit")
    recovery = recover_and_verify(
        data_dir,
        registry,
        killed,
        expect_durable=where in ("catalog_committed", "returned") if phase == "commit" else None,
    )
    if where in ("files_written", "catalog_updated", "removing"):
        # written and never referenced, or no longer referenced: GC's job, done above
        assert recovery.orphans > 0
    else:
        assert recovery.orphans == 0
    # Files go only after their rows: a row the catalog still knows always has its file.
    assert recovery.missing_replaced == 0
    # A new writer resumes where the recovery left off; kill it once more just after
    # its first acknowledged commit.
    proc = start_writer(workers, data_dir, recovery.batches)
    proc.wait_for(lambda line: line.startswith("COMMIT_DONE"))
    killed = Killed.parse(proc.sigkill(), recovery.batches)
    recover_and_verify(data_dir, registry, killed)

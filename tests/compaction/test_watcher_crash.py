"""A crash of the watcher mid-compaction leaves the store consistent; the next run
completes the work.

Each case builds a fresh store holding four days ~40 days old, each written once
(~40k payments a day) and then fragmented by 15 commits of cancellations touching
every day (16 segments per day, and per old rollup month partition; a day compacts
in ~0.2-0.5 s). It runs the real daemon (``tally compaction watch``, a subprocess
logging at INFO to stderr) and SIGKILLs it once it has logged the n-th
``compacting <datasource>/<partition>`` line (late tasks run oldest-fragmented
first, then by name: the four days, then the daily and hourly rollup months):

* ``start`` — at once: the kill lands in the compaction's read/merge work;
* ``file`` — once that partition's directory holds a new Parquet file: the kill
  lands while the compacted segment is being written, before the catalog swap,
  leaving a (partial) file no catalog row refers to.

Each case checks that the killed task never finished (its partition still holds all
its segments; the tasks before it hold one) and then, in a fresh store and reader:
every live segment's file exists; the merged view (key, version, event id, status,
canceled amount) and both rollups equal the naive reference row for row;
``collect_garbage(orphan_grace_s=0)`` leaves on disk exactly the live files (the
``file`` cases must have left an orphan); the answers are unchanged; then ``tally
compaction run`` leaves every late partition in one segment, nothing but a pack
due (packs wait for the freshly compacted days to be quiet), ``compaction status``
shows nothing due, and the answers are the same.

What it does not prove: kills at exact points inside the swap transaction or GC
(``tests/storage/test_crash_safety.py`` covers those for the store itself); a
crash while ingestion commits concurrently; a power loss (SIGKILL keeps the page
cache); two watchers at once.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pytest

from compaction.watcher import Watcher, window_test
from producers.generate import GeneratorConfig, approval_tables, cancellations_for
from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.cli import tally
from tests.factories import latest_by_key, reference_rollup

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEOUL = ZoneInfo("Asia/Seoul")
DAYS = 4
PER_DAY = 40_000
LATE_COMMITS = 15
CANCELS_PER_COMMIT = 400
ROLLUPS = ("payments_hourly", "payments_daily")
MERGED_COLUMNS = ("txn_id", "version", "event_id", "status", "canceled_amount")

Part = tuple[str, str]


@dataclass(frozen=True)
class Workload:
    """The commits that build the store (in order) and what the store must answer."""

    commits: list[pa.Table]
    merged: pa.Table  # MERGED_COLUMNS of the latest version of every key, by txn_id
    rollups: dict[str, pa.Table]  # every group with its metrics, sorted by group


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, store=StoreSettings(gc_grace_s=0.0, orphan_grace_s=3600.0))


@pytest.fixture(scope="module")
def workload(registry: SpecRegistry) -> Workload:
    spec = registry.get("payments")
    first = datetime.now(SEOUL).date() - timedelta(days=40)
    config = GeneratorConfig(
        transactions=DAYS * PER_DAY,
        merchants=300,
        days=DAYS,
        start=datetime(first.year, first.month, first.day, tzinfo=SEOUL),
        seed=42,
    )
    approvals = pa.concat_tables(approval_tables(config, DAYS * PER_DAY))
    commits = [approvals]  # one segment per day
    order = np.random.default_rng(7).permutation(approvals.num_rows)
    for i in range(LATE_COMMITS):  # each: one more segment in every old day and month
        picked = approvals.take(
            pa.array(order[i * CANCELS_PER_COMMIT : (i + 1) * CANCELS_PER_COMMIT])
        )
        commits.append(cancellations_for(picked, datetime.now(UTC), seed=i))
    latest = latest_by_key(spec, pa.concat_tables(commits).to_pylist())
    rows = list(latest.values())
    merged = pa.table({c: [r[c] for r in rows] for c in MERGED_COLUMNS})
    rollups = {}
    for name in ROLLUPS:
        groups = reference_rollup(spec, name, latest)
        names = _rollup_columns(spec, name)
        columns = [list(c) for c in zip(*(k + v for k, v in groups.items()), strict=True)]
        rollups[name] = pa.table(dict(zip(names, columns, strict=True)))
    return Workload(commits, _sorted(merged), {n: _sorted(t) for n, t in rollups.items()})


def _build(data_dir: Path, registry: SpecRegistry, workload: Workload) -> dict[Part, int]:
    """Commit the workload (late: the days are old); the late partitions' segment counts.

    Built afresh for every case: the catalog stores absolute paths, so a copied
    store would still point at (and compact, and collect) the original's files."""
    store = EmbeddedStore(_settings(data_dir), registry)
    try:
        for table in workload.commits:
            store.commit("payments", table)
        now = datetime.now(UTC)
        old = window_test(registry, store)
        late = {
            (s.datasource, s.partition): s.segments
            for s in store.partition_stats()
            if old(s.datasource, s.partition, now)
        }
    finally:
        store.close()
    assert len(late) == DAYS + len(ROLLUPS), late
    assert all(n == LATE_COMMITS + 1 for n in late.values()), late
    return late


# --- the daemon --------------------------------------------------------------------------


class Daemon:
    """``tally compaction watch`` in a subprocess; a thread drains its stderr (the log)."""

    def __init__(self, data_dir: Path) -> None:
        env = {**os.environ, "TALLY_DATA_DIR": str(data_dir), "TALLY_STORE__GC_GRACE_S": "0"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tally", "compaction", "watch", "--interval", "0.1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_nth(self, word: str, nth: int, timeout_s: float = 60.0) -> str:
        """The ``nth`` log line with `` <word> `` in it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {nth}. {word!r} line; log: {self.lines[-10:]}") from None
            if line is None:
                raise AssertionError(f"watcher exited ({self.popen.wait()}): {self.lines[-10:]}")
            self.lines.append(line)
            if sum(f" {word} " in ln for ln in self.lines) == nth and f" {word} " in line:
                return line

    def sigkill(self) -> list[str]:
        assert self.popen.poll() is None, f"watcher died by itself: {self.lines[-10:]}"
        os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=30) == -signal.SIGKILL
        self._thread.join(timeout=30)
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return self.lines

    def close(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._thread.join(timeout=30)
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def _task(line: str) -> Part:
    """(datasource, partition) of a ``compacting ds/partition (kind): ...`` line."""
    target = line.split(" compacting ", 1)[1].split(" ", 1)[0]
    ds, part = target.split("/", 1)
    return ds, part


def _parquet(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*.parquet")}


# --- checks ------------------------------------------------------------------------------


def _rollup_columns(spec: DatasourceSpec, name: str) -> list[str]:
    return ["bucket", *spec.rollup(name).dimensions, *(m.name for m in spec.parsed_metrics)]


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(c, "ascending") for c in table.column_names]).combine_chunks()


def _same(got: pa.Table, want: pa.Table, what: str) -> None:
    got = _sorted(got.cast(want.schema))
    if got.equals(want):
        return
    left = {tuple(r.values()) for r in got.to_pylist()}
    right = {tuple(r.values()) for r in want.to_pylist()}
    unexpected, missing = sorted(left - right, key=str), sorted(right - left, key=str)
    raise AssertionError(
        f"{what}: {got.num_rows} rows, want {want.num_rows}; "
        f"unexpected {unexpected[:3]}, missing {missing[:3]}"
    )


def _assert_answers(settings: Settings, registry: SpecRegistry, workload: Workload) -> None:
    """The merged view and both rollups equal the reference, row for row."""
    spec = registry.get("payments")
    reader = EmbeddedReader(settings, registry)
    try:
        merged = reader.arrow(f"SELECT {', '.join(MERGED_COLUMNS)} FROM payments")
        _same(merged, workload.merged, "merged view")
        for name in ROLLUPS:
            cols = ", ".join(f'"{c}"' for c in _rollup_columns(spec, name))
            _same(reader.arrow(f"SELECT {cols} FROM {name}"), workload.rollups[name], name)
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("mode", "nth"),
    [("start", 1), ("file", 2), ("start", 3), ("file", 4), ("start", 6)],
)
def test_sigkill_mid_compaction_then_the_next_run_completes(
    workload: Workload, registry: SpecRegistry, tmp_path: Path, mode: str, nth: int
) -> None:
    data_dir = tmp_path / "data"
    late = _build(data_dir, registry, workload)
    settings = _settings(data_dir)
    segments_dir = settings.segments_dir
    before = _parquet(segments_dir)

    daemon = Daemon(data_dir)
    try:
        line = daemon.wait_for_nth("compacting", nth)
        killed = _task(line)
        assert killed in late, line
        if mode == "file":
            folder = segments_dir / killed[0] / killed[1]
            deadline = time.monotonic() + 30
            while not _parquet(folder) - before:
                assert time.monotonic() < deadline, "the compacted segment never appeared"
                time.sleep(0.001)
        lines = daemon.sigkill()
    finally:
        daemon.close()
    finished = [ln for ln in lines if f" compacted {killed[0]}/{killed[1]} " in ln]
    assert not finished, f"the kill came too late: {killed} was compacted: {lines[-5:]}"

    store = EmbeddedStore(settings, registry)
    try:
        stats = {(s.datasource, s.partition): s.segments for s in store.partition_stats()}
        assert stats[killed] == late[killed], "the killed task changed its partition"
        done = [_task(ln) for ln in lines if " compacting " in ln][: nth - 1]
        assert all(stats[p] == 1 for p in done), (done, stats)

        # Consistent as the crash left it: every live file there, every answer exact.
        live = {s.path for s in store.live_segments()}
        assert all(Path(p).exists() for p in live)
        with store.core.catalog.read():
            known = store.core.catalog.all_paths()
        orphans = _parquet(segments_dir) - known
        if mode == "file":
            assert orphans, "the kill was meant to leave the half-written segment behind"
        _assert_answers(settings, registry, workload)

        # Garbage collection removes what the crash left and what was replaced, only that.
        removed = store.compactor.collect_garbage(orphan_grace_s=0)
        assert removed >= len(orphans)
        live = {s.path for s in store.live_segments()}
        with store.core.catalog.read():
            assert store.core.catalog.all_paths() == live
        assert _parquet(segments_dir) == live
        _assert_answers(settings, registry, workload)
    finally:
        store.close()

    ran = tally("compaction", "run", "--format", "json", data_dir=data_dir)
    assert ran.code == 0, ran.err
    compacted = {(r["datasource"], r["partition"]) for r in ran.json()["compacted"]}
    assert killed in compacted

    store = EmbeddedStore(settings, registry)
    try:
        stats = {(s.datasource, s.partition): s.segments for s in store.partition_stats()}
        assert all(stats[p] == 1 for p in late), stats
        # Nothing left but packing the compacted days once they have been quiet.
        assert {t.kind for t in Watcher(settings, registry, store).due()} <= {"pack"}
        assert all(Path(s.path).exists() for s in store.live_segments())
        store.compactor.collect_garbage(orphan_grace_s=0)
        assert _parquet(segments_dir) == {s.path for s in store.live_segments()}
    finally:
        store.close()
    _assert_answers(settings, registry, workload)
    status = tally("compaction", "status", "--format", "json", data_dir=data_dir)
    assert status.code == 0, status.err
    assert not any(p["due"] for p in status.json()["partitions"])
    print(f"{mode} #{nth}: killed compacting {killed}, {len(orphans)} orphan(s), {removed} removed")

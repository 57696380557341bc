"""Compaction benchmark: how soon late writes are compacted under steady ingestion, and
what fragmentation costs a query before and after the watcher's work.

Setup: 60 days of history (days 60 … 1 before today, Seoul) committed to a fresh
store, then settled by the watcher (late days compacted, cold days packed a month a
file), as a long-running deployment would be.

(a) steady — the real daemon (``tally compaction watch``, default settings: poll 1 s,
    debounce 1 s, max delay 5 s) runs as its own process while this process commits
    today's new payments every 250 ms (``rate`` rows/s) and, at random moments
    (exponential gaps), a batch of cancellations of payments approved 2–60 days
    ago in the same commit (yesterday is inside the 1-day active window: a write
    there is not late, it is merged size-tiered). For each late write, the time from
    its commit (the base partition's ``last_write_at``) to the first poll of
    ``partition_stats`` (every 50 ms, from another connection) showing the write and
    a single segment again: ``compaction_detect_to_done_p50_s``/``_p99_s`` (target
    p99 ≤ 10 s); the rollup month partitions the writes also fragment are compacted
    by the same daemon but not timed here. Ingestion goes on until every late write
    is compacted (at most 60 s more; ``compaction_late_writes_not_compacted`` counts
    any left). ``compaction_steady_commit_p99_ms``: the writer's commits meanwhile;
    ``compaction_<kind>_tasks``/``_rewritten_mb``: the daemon's work by kind (from
    its log); a month is repacked once quiet for ``compaction.pack_delay_s``, so
    during the run late-compacted days stay files of their own.
(b) query — the daemon stopped and the store settled again: a per-hour aggregate of
    one day over the base view (``force_base``, pruned to that day), on a day
    fragmented by ``fragments`` tiny late commits, then on the same day right after
    the watcher's late compaction, and on an unfragmented day of the same weekday
    (and so about the same size) a week earlier; the compacted day and its twin are
    timed alternately in one reader state. ``compacted_vs_unfragmented_ratio`` is
    compacted p50 / unfragmented p50 (target ≤ 1.2). The compacted day is a file of
    its own while its twin is read from its month's pack; once the month has been
    quiet, the watcher packs it again: ``compaction_repacked_query_p50_ms`` and
    ``repacked_vs_unfragmented_ratio`` are that steady state.

    .venv/bin/python bench/compaction.py --scale small|full [--data-dir DIR] [--keep]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import Figures, Log, format_table, parser, percentile, stopwatch, write_results
from compaction.watcher import Watcher
from producers.generate import TS, GeneratorConfig, approval_tables, cancellations_for
from rollups.request import AggregateRequest
from rollups.router import run
from storage.calendar import partitions_of
from storage.embedded.catalog import Catalog
from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths

NAME = "compaction"
DATASOURCE = "payments"
ROOT = Path(__file__).resolve().parents[1]
SEOUL = ZoneInfo("Asia/Seoul")
SEED = 20261130
HISTORY_DAYS = 60
TICK_S = 0.25  # the writer commits this often
POLL_S = 0.05  # the monitor reads partition statistics this often
SAMPLE_SHARE = 0.05  # of history kept in memory as candidates for late cancellations
TARGET_DAYS_AGO, TWIN_DAYS_AGO = 20, 27  # (b): the fragmented day and its twin


@dataclass(frozen=True)
class Scale:
    history_per_day: int  # payments approved per day of history
    merchants: int
    steady_s: float  # (a) seconds of late writes under steady ingestion
    rate: int  # (a) new payments committed per second
    late_every_s: float  # (a) mean gap between late writes
    late_rows: int  # (a) cancellations per late write
    fragments: int  # (b) tiny late commits into the target day
    fragment_rows: int  # (b) cancellations per tiny commit
    query_reps: int  # (b) timed repetitions per query


SCALES = {
    "small": Scale(
        history_per_day=8_000,
        merchants=1_000,
        steady_s=60,
        rate=2_000,
        late_every_s=0.75,
        late_rows=20,
        fragments=100,
        fragment_rows=3,
        query_reps=20,
    ),
    "full": Scale(
        history_per_day=40_000,
        merchants=3_000,
        steady_s=240,
        rate=5_000,
        late_every_s=0.5,
        late_rows=20,
        fragments=300,
        fragment_rows=3,
        query_reps=40,
    ),
}


@dataclass
class Sample:
    at: float  # time.time() once the read finished
    parts: dict[str, tuple[int, float | None]]  # base partition → segments, last write


@dataclass
class Monitor:
    """Polls the base partitions' statistics from its own catalog connection."""

    settings: Settings
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        catalog = Catalog(self.settings.catalog_path, readonly=True)
        try:
            while not self.stop.is_set():
                with catalog.read():
                    rows = catalog.stats_rows([DATASOURCE])
                parts: dict[str, tuple[int, float | None]] = {}
                for _ds, part, segments, *_, last_write, _compacted in rows:
                    lw = None if last_write is None else float(last_write)  # type: ignore[arg-type]
                    parts[str(part)] = (int(segments), lw)  # type: ignore[call-overload]
                self.samples.append(Sample(time.time(), parts))
                self.stop.wait(POLL_S)
        finally:
            catalog.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def done_after(self, partition: str, write: float, since: int = 0) -> float | None:
        """When a poll first showed ``write`` (a last-write time) compacted away."""
        for s in self.samples[since:]:
            if _done(s.parts.get(partition, (0, None)), write):
                return s.at
        return None


class Daemon:
    """``tally compaction watch`` in its own process, as an operator runs it."""

    def __init__(self, data_dir: Path) -> None:
        self.log_path = data_dir / "watch.log"
        self._log = self.log_path.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tally", "compaction", "watch"],
            cwd=ROOT,
            env={**os.environ, "TALLY_DATA_DIR": str(data_dir)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> str:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(30)
        self._log.close()
        text = self.log_path.read_text()
        if code != 0:
            raise SystemExit(f"the watcher exited with {code}:\n{text[-2000:]}")
        return text


class Bench:
    def __init__(self, scale: Scale, data_dir: Path, log: Log) -> None:
        self.scale = scale
        self.log = log
        self.data_dir = data_dir
        self.registry = SpecRegistry.load(builtin_spec_paths())
        self.spec: DatasourceSpec = self.registry.get(DATASOURCE)
        self.settings = Settings(data_dir=data_dir)
        self.store = EmbeddedStore(self.settings, self.registry)
        self.reader = EmbeddedReader(self.settings, self.registry)
        self.figures = Figures()
        self.rng = np.random.default_rng(SEED)
        self.today = datetime.now(SEOUL).date()
        first = self.today - timedelta(days=HISTORY_DAYS)
        self.config = GeneratorConfig(
            transactions=scale.history_per_day * HISTORY_DAYS,
            merchants=scale.merchants,
            days=HISTORY_DAYS,
            start=datetime(first.year, first.month, first.day, tzinfo=SEOUL),
            seed=SEED,
        )
        self.candidates: dict[str, pa.Table] = {}  # old partition → payments to cancel
        self.used: dict[str, int] = {}  # how many candidates of it were canceled

    def close(self) -> None:
        self.reader.close()
        self.store.close()

    def partition(self, days_ago: int) -> str:
        return (self.today - timedelta(days=days_ago)).isoformat()

    def day_range(self, days_ago: int) -> tuple[datetime, datetime]:
        day = self.today - timedelta(days=days_ago)
        start = datetime(day.year, day.month, day.day, tzinfo=SEOUL)
        return start.astimezone(UTC), (start + timedelta(days=1)).astimezone(UTC)

    # --- setup -----------------------------------------------------------------------

    def load(self) -> None:
        rows = 0
        samples: list[pa.Table] = []
        with stopwatch() as t:
            for table in approval_tables(self.config, 50_000):
                self.store.commit(DATASOURCE, table)
                rows += table.num_rows
                keep = np.flatnonzero(self.rng.random(table.num_rows) < SAMPLE_SHARE)
                samples.append(table.take(pa.array(keep)))
        sample = pa.concat_tables(samples)
        ds = self.spec.datasource
        keys = partitions_of(sample.column(ds.time), ds.granularity, ds.timezone)
        for part in sorted(set(keys.to_pylist())):
            chosen = sample.filter(pc.equal(keys, part))
            order = self.rng.permutation(chosen.num_rows)
            self.candidates[part] = chosen.take(pa.array(order))
        self.log(f"history: {rows:,} payments over {HISTORY_DAYS} days in {t[0]:.1f}s")
        self.figures.add("compaction_history_rows", rows, "rows")

    def settle(self) -> None:
        """Run the watcher until nothing is due, its clock moved past every delay (the
        debounce, the max delay and the pack delay)."""
        watcher = self.watcher_ahead()
        with stopwatch() as t:
            while watcher.tick():
                pass
        self.store.compactor.collect_garbage()
        report = watcher.report
        self.log(f"settled: {report.compactions} compactions and packs in {t[0]:.1f}s")

    def watcher_ahead(self) -> Watcher:
        """A watcher whose clock runs past every delay: what the daemon would do once
        the store has been quiet long enough."""
        c = self.settings.compaction
        ahead = timedelta(seconds=max(c.max_delay_s, c.pack_delay_s) + 5)
        return Watcher(
            self.settings, self.registry, self.store, clock=lambda: datetime.now(UTC) + ahead
        )

    # --- (a) late writes under steady ingestion -----------------------------------------------

    def new_payments(self) -> Callable[[], pa.Table]:
        """Tables of today's new payments; each call stamps them "now"."""
        sc = self.scale
        fresh = GeneratorConfig(
            transactions=int(sc.rate * (sc.steady_s + 120) * 1.2),
            merchants=sc.merchants,
            days=1,
            start=self.config.start + timedelta(days=HISTORY_DAYS),
            seed=SEED + 1,
            first_seq=self.config.transactions,  # ids never repeat the history's
        )
        tables = approval_tables(fresh, max(1, int(sc.rate * TICK_S)))

        def take() -> pa.Table:
            table = next(tables)
            now_us = int(time.time() * 1e6)
            stamps = pa.array(now_us - 1000 * np.arange(table.num_rows, dtype=np.int64)).cast(TS)
            for name in ("approved_at", "occurred_at"):
                table = table.set_column(table.schema.get_field_index(name), name, stamps)
            return table

        return take

    def late_batch(self, now: datetime) -> tuple[str, pa.Table] | None:
        sc = self.scale
        days_ago = int(self.rng.integers(2, HISTORY_DAYS + 1))
        part = self.partition(days_ago)
        pool = self.candidates.get(part)
        start = self.used.get(part, 0)
        if pool is None or start + sc.late_rows > pool.num_rows:
            return None
        self.used[part] = start + sc.late_rows
        cancels = cancellations_for(pool.slice(start, sc.late_rows), now, seed=SEED + start)
        return part, cancels

    def steady(self) -> None:
        sc = self.scale
        new = self.new_payments()
        monitor = Monitor(self.settings)
        monitor.start()
        daemon = Daemon(self.data_dir)
        writes: list[tuple[str, float, int]] = []  # partition, last_write_at, sample index
        commit_ms: list[float] = []
        rows = 0
        try:
            time.sleep(2.0)  # the daemon imports and opens the store
            started = time.monotonic()
            next_late = started + float(self.rng.exponential(sc.late_every_s))
            deadline = started + sc.steady_s
            pending_until = deadline + 60.0
            while True:
                tick = time.monotonic()
                batch = new()
                late = None
                if tick < deadline and tick >= next_late:
                    late = self.late_batch(datetime.now(UTC))
                    next_late = tick + float(self.rng.exponential(sc.late_every_s))
                if late is not None:
                    batch = pa.concat_tables([batch, late[1].select(batch.schema.names)])
                with stopwatch() as t:
                    self.store.commit(DATASOURCE, batch)
                commit_ms.append(1000 * t[0])
                rows += batch.num_rows
                if late is not None:
                    stats = self.store.partition_stats(DATASOURCE)
                    lw = next(s.last_write_at for s in stats if s.partition == late[0])
                    assert lw is not None
                    writes.append((late[0], lw.timestamp(), len(monitor.samples)))
                if tick >= deadline:
                    last = monitor.samples[-1].parts if monitor.samples else {}
                    outstanding = [p for p, w, _ in writes if not _done(last.get(p, (0, None)), w)]
                    if not outstanding or tick >= pending_until:
                        break
                time.sleep(max(0.0, TICK_S - (time.monotonic() - tick)))
            elapsed = time.monotonic() - started
        finally:
            monitor.close()
            text = daemon.stop()
        lags: list[float] = []
        missing = 0
        for part, write, since in writes:
            done = monitor.done_after(part, write, max(0, since - 1))
            if done is None:
                missing += 1
            else:
                lags.append(done - write)
        self.log(
            f"steady: {rows:,} rows in {elapsed:.0f}s, {len(writes)} late writes into "
            f"{len({p for p, _, _ in writes})} partitions, {missing} never compacted"
        )
        if not lags:
            raise SystemExit("steady: no late write was measured")
        fig = self.figures
        fig.add("compaction_steady_rows_per_s", rows / elapsed, "rows/s")
        fig.add("compaction_steady_commit_p99_ms", percentile(commit_ms, 99), "ms")
        fig.add("compaction_late_writes", len(writes), "writes")
        fig.add("compaction_late_partitions", len({p for p, _, _ in writes}), "partitions")
        fig.add("compaction_late_writes_not_compacted", missing, "writes")
        fig.add("compaction_detect_to_done_p50_s", percentile(lags, 50), "s")
        fig.add("compaction_detect_to_done_p99_s", percentile(lags, 99), "s")
        fig.add("compaction_detect_to_done_max_s", max(lags), "s")
        rewritten = _rewritten(text)
        for kind in ("late", "tiered", "pack"):
            tasks, size = rewritten.get(kind, (0, 0))
            fig.add(f"compaction_{kind}_tasks", tasks, "tasks")
            fig.add(f"compaction_{kind}_rewritten_mb", size / 2**20, "MB")

    # --- (b) query latency: fragmented, compacted, unfragmented --------------------------------

    def day_query(self, days_ago: int) -> Callable[[], list[list[Any]]]:
        start, end = self.day_range(days_ago)
        req = AggregateRequest(start=start, end=end, granularity="hour")

        def query() -> list[list[Any]]:
            return run(self.reader, self.spec, req, force_base=True)[1].rows

        return query

    def timed(self, *queries: Callable[[], Any]) -> list[float]:
        """p50 (ms) of each query, timed round-robin after one warm-up each."""
        for q in queries:
            q()
        times: list[list[float]] = [[] for _ in queries]
        for _ in range(self.scale.query_reps):
            for i, q in enumerate(queries):
                with stopwatch() as t:
                    q()
                times[i].append(1000 * t[0])
        return [percentile(ts, 50) for ts in times]

    def wait_due(self, watcher: Watcher, kind: str, partition: str) -> Any:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for task in watcher.due(DATASOURCE):
                if task.kind == kind and (kind == "pack" or task.partition == partition):
                    return task
            time.sleep(0.1)
        raise SystemExit(f"query: no {kind} task for {partition} became due")

    def segments(self, partition: str) -> int:
        stats = self.store.partition_stats(DATASOURCE)
        return next(s.segments for s in stats if s.partition == partition)

    def query(self) -> None:
        sc = self.scale
        self.settle()
        target, twin = self.partition(TARGET_DAYS_AGO), self.partition(TWIN_DAYS_AGO)
        if self.segments(target) != 1 or self.segments(twin) != 1:
            raise SystemExit("query: the target and twin days must start in one segment")
        lo, hi = self.day_range(TARGET_DAYS_AGO)
        open_ = self.reader.arrow(
            "SELECT * FROM payments WHERE approved_at >= ? AND approved_at < ? "
            "AND status = 'DONE' ORDER BY txn_id",
            [lo, hi],
        )
        need = sc.fragments * sc.fragment_rows
        if open_.num_rows < need:
            raise SystemExit(f"query: {target} has only {open_.num_rows} open payments")
        picked = open_.take(pa.array(self.rng.permutation(open_.num_rows)[:need]))
        for i in range(sc.fragments):
            rows = picked.slice(i * sc.fragment_rows, sc.fragment_rows)
            self.store.commit(DATASOURCE, cancellations_for(rows, datetime.now(UTC), seed=i))
        segments = self.segments(target)
        self.log(f"query: {target} in {segments} segments after {sc.fragments} late commits")
        fig = self.figures
        fig.add("compaction_fragment_segments", segments, "segments")
        fig.add(
            "compaction_target_rows",
            self.reader.query(
                "SELECT count(*) FROM payments WHERE approved_at >= ? AND approved_at < ?",
                [lo, hi],
            ).rows[0][0],
            "rows",
        )
        tlo, thi = self.day_range(TWIN_DAYS_AGO)
        fig.add(
            "compaction_twin_rows",
            self.reader.query(
                "SELECT count(*) FROM payments WHERE approved_at >= ? AND approved_at < ?",
                [tlo, thi],
            ).rows[0][0],
            "rows",
        )
        on_target, on_twin = self.day_query(TARGET_DAYS_AGO), self.day_query(TWIN_DAYS_AGO)
        before = on_target()
        (fragmented,) = self.timed(on_target)
        fig.add("compaction_fragmented_query_p50_ms", fragmented, "ms")

        watcher = Watcher(self.settings, self.registry, self.store)  # real clock
        task = self.wait_due(watcher, "late", target)
        with stopwatch() as t:
            watcher.run_task(task)
        fig.add("compaction_fragmented_compact_s", t[0], "s")
        if self.segments(target) != 1 or on_target() != before:
            raise SystemExit("query: the late compaction left segments or changed the answer")
        compacted, unfragmented = self.timed(on_target, on_twin)
        fig.add("compaction_compacted_query_p50_ms", compacted, "ms")
        fig.add("compaction_unfragmented_query_p50_ms", unfragmented, "ms")
        fig.add("compacted_vs_unfragmented_ratio", compacted / unfragmented, "x")

        quiet = self.watcher_ahead()  # packing waits for the month to be quiet
        quiet.run_task(self.wait_due(quiet, "pack", target))
        while quiet.tick(DATASOURCE):
            pass
        if on_target() != before:
            raise SystemExit("query: packing changed the answer")
        repacked, unfragmented = self.timed(on_target, on_twin)
        fig.add("compaction_repacked_query_p50_ms", repacked, "ms")
        fig.add("repacked_vs_unfragmented_ratio", repacked / unfragmented, "x")


def _rewritten(log: str) -> dict[str, tuple[int, int]]:
    """kind → (tasks, bytes read and rewritten) from the daemon's ``compacted`` lines:
    ``... compacted <ds>/<partition> (<kind>): <n> segments → 1, <bytes> bytes``."""
    out: dict[str, tuple[int, int]] = {}
    for line in log.splitlines():
        if " compacted " not in line or " bytes" not in line:
            continue
        kind = line.split("(", 1)[1].split(")", 1)[0]
        size = int(line.rsplit(",", 1)[1].split()[0])
        tasks, total = out.get(kind, (0, 0))
        out[kind] = (tasks + 1, total + size)
    return out


def _done(state: tuple[int, float | None], write: float) -> bool:
    """Whether a poll's (segments, last write) shows ``write`` and one segment. The
    write time went through a datetime (microseconds), hence the tolerance."""
    segments, last = state
    return last is not None and last >= write - 1e-5 and segments == 1


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, help="build the store here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp data dir")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    log = Log()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tally-bench-compaction-"))
    if args.data_dir and any(data_dir.glob("*")):
        raise SystemExit(f"{data_dir} is not empty; the benchmark needs a fresh store")
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"scale={args.scale} data_dir={data_dir}")
    bench = Bench(scale, data_dir, log)
    try:
        bench.load()
        bench.settle()
        bench.steady()
        bench.query()
    finally:
        bench.close()
        if args.data_dir is None and not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    path = write_results(NAME, bench.figures, args.scale)
    print(format_table(bench.figures, f"bench/{NAME} --scale {args.scale}"))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

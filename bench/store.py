"""Embedded store benchmark: commit throughput, rollup routing, lookups, fragmentation.

Phases, in order (one process is both the writer and the reader):

1. load — a stream of new payments committed in 10k-row batches, day after day,
   each batch landing in the then-active day partition (the commit's ``now`` follows
   the stream clock). Its commit time is ``store_commit_rows_per_s``.
2. late — 10k-row batches of 80% new payments and 20% cancellations of payments
   approved over the previous 90 days: ``store_commit_late_rows_per_s``.
3. compact every partition that has more than one segment, as the compaction
   watcher would once it caught up (timed, informational).
4. sales — a 90-day, by-day sales aggregate of one mid-volume merchant through the
   rollup router, and the same request forced onto the base view; both answers
   must agree. p50/p99 of each and the speedup.
5. lookup — 50 random existing txn_ids of one merchant through ``reader.lookup``
   with the tenant and the partitions (as the search index would supply them).
6. fragmentation — a per-hour aggregate of one day over the base view, on a
   comparable unfragmented day, on a day fragmented into 1,000 segments by 1,000
   tiny late commits, and on that day after ``store.compact`` — timed alternately
   with the unfragmented day, in the same reader state, for the ratio.

    .venv/bin/python bench/store.py --scale small|full [--data-dir DIR] [--keep]
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import (
    Figures,
    Log,
    format_table,
    max_time,
    parser,
    peak_rss_mb,
    percentile,
    repeat_ms,
    stopwatch,
    write_results,
)
from producers.generate import GeneratorConfig, approval_tables, cancellations_for
from rollups.request import AggregateRequest
from rollups.router import route, run
from storage import open_reader, open_store
from storage.calendar import partitions_of
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths

NAME = "store"
DATASOURCE = "payments"
BATCH = 10_000
LATE_SHARE = 0.2  # of a late batch: cancellations of old keys
LATE_WINDOW_DAYS = 90


@dataclass(frozen=True)
class Scale:
    load_transactions: int  # approvals streamed in phase 1
    days: int  # history loaded before the active day
    merchants: int
    late_batches: int
    fragments: int  # tiny commits into one old partition
    fragment_rows: int  # rows per tiny commit
    sales_reps: int
    lookup_reps: int
    fragment_reps: int


SCALES = {
    # 2.92M + 10 late batches × 8k new keys = 3M stored transactions.
    "small": Scale(
        load_transactions=2_920_000,
        days=120,
        merchants=2_000,
        late_batches=10,
        fragments=1_000,
        fragment_rows=2,
        sales_reps=50,
        lookup_reps=50,
        fragment_reps=10,
    ),
    # 9.8M + 20 late batches × 8k new keys = 10M stored transactions.
    "full": Scale(
        load_transactions=9_840_000,
        days=120,
        merchants=5_000,
        late_batches=20,
        fragments=1_000,
        fragment_rows=2,
        sales_reps=100,
        lookup_reps=100,
        fragment_reps=20,
    ),
}
START = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(hours=9)  # 2026-01-01 00:00 in Seoul
SEED = 20260101


class Bench:
    def __init__(self, scale: Scale, data_dir: Path, log: Log) -> None:
        self.scale = scale
        self.log = log
        self.registry = SpecRegistry.load(builtin_spec_paths())
        self.spec: DatasourceSpec = self.registry.get(DATASOURCE)
        settings = Settings(data_dir=data_dir)
        store = open_store(settings, self.registry)
        assert isinstance(store, EmbeddedStore)
        self.store = store
        self.reader = open_reader(settings, self.registry)
        self.figures = Figures()
        self.rng = random.Random(SEED)
        self.config = GeneratorConfig(
            transactions=scale.load_transactions,
            merchants=scale.merchants,
            days=scale.days,
            start=START,
            seed=SEED,
        )
        self.active_day = scale.days  # day index of the active partition after loading
        self.clock = START  # the stream's "now"
        self.sample: list[pa.Table] = []  # committed approvals, candidates for late writes

    def close(self) -> None:
        self.reader.close()
        self.store.close()

    def day_start(self, day: int) -> datetime:
        return START + timedelta(days=day)

    def partition(self, day: int) -> str:
        return self.day_start(day).astimezone(self.spec.tz).strftime("%Y-%m-%d")

    def commit(self, table: pa.Table, now: datetime) -> float:
        with stopwatch() as t:
            self.store.commit(DATASOURCE, table, now=now)
        return t[0]

    # --- 1. load: new keys in the active partition -------------------------------------

    def load(self) -> None:
        sc = self.scale
        needed = sc.late_batches * int(BATCH * LATE_SHARE)
        keep = min(1.0, max(0.02, 4 * needed / max(sc.load_transactions, 1)))
        np_rng = np.random.default_rng(SEED)
        seconds, rows, batches = 0.0, 0, 0
        with stopwatch() as wall:
            for table in approval_tables(self.config, BATCH):
                now = max_time(table, "approved_at")
                seconds += self.commit(table, now)
                self.clock = now
                rows += table.num_rows
                batches += 1
                chosen = np.flatnonzero(np_rng.random(table.num_rows) < keep)
                self.sample.append(table.take(pa.array(chosen)))
                if batches % 100 == 0:
                    self.log(f"load: {rows:,} rows, {rows / seconds:,.0f} rows/s in commit")
        self.log(f"load: {rows:,} rows in {batches} batches, commit {seconds:.1f}s/{wall[0]:.1f}s")
        self.figures.add("store_commit_rows_per_s", rows / seconds, "rows/s")
        self.figures.add("store_commit_batch_ms", 1000 * seconds / batches, "ms")
        self.figures.add("load_rows", rows, "rows")

    # --- 2. late: 20% cancellations of old keys, 80% new keys ------------------------------

    def late(self) -> None:
        sc = self.scale
        late_rows = int(BATCH * LATE_SHARE)
        new_rows = BATCH - late_rows
        fresh = GeneratorConfig(
            transactions=sc.late_batches * new_rows,
            merchants=sc.merchants,
            days=1,
            start=self.day_start(self.active_day),
            seed=SEED,
            first_seq=sc.load_transactions,  # ids continue the load's, never repeat them
        )
        candidates = pa.concat_tables(self.sample)
        self.sample = []
        approved = candidates.column("approved_at")
        lo = self.day_start(self.active_day - LATE_WINDOW_DAYS)
        hi = self.day_start(self.active_day)
        window = pc.and_(pc.greater_equal(approved, lo), pc.less(approved, hi))
        candidates = candidates.filter(window)
        order = np.random.default_rng(SEED + 1).permutation(candidates.num_rows)
        if len(order) < sc.late_batches * late_rows:
            raise SystemExit("late: too few sampled old payments; raise the sample share")
        seconds, rows, touched = 0.0, 0, 0
        for i, new in enumerate(approval_tables(fresh, new_rows)):
            if i >= sc.late_batches:
                break
            now = max_time(new, "approved_at")
            picked = candidates.take(pa.array(order[i * late_rows : (i + 1) * late_rows]))
            cancels = cancellations_for(picked, now, seed=SEED + i)
            batch = pa.concat_tables([new, cancels.select(new.schema.names)])
            with stopwatch() as t:
                result = self.store.commit(DATASOURCE, batch, now=now)
            seconds += t[0]
            rows += batch.num_rows
            touched += len(result.partitions)
            self.clock = now
        batches = min(sc.late_batches, i + 1)
        per_batch = touched / batches
        self.log(
            f"late: {rows:,} rows, {batches} batches, {seconds:.1f}s, {per_batch:.0f} parts/batch"
        )
        self.figures.add("store_commit_late_rows_per_s", rows / seconds, "rows/s")
        self.figures.add("store_commit_late_batch_ms", 1000 * seconds / batches, "ms")
        self.figures.add("late_batch_partitions", per_batch, "partitions")

    # --- 3. compaction catch-up --------------------------------------------------------

    def compact_all(self) -> None:
        stats = [s for s in self.store.partition_stats() if s.segments > 1]
        with stopwatch() as t:
            for s in stats:
                self.store.compactor.compact(s.datasource, s.partition)
        self.log(f"compacted {len(stats)} partitions in {t[0]:.1f}s")
        self.figures.add("compact_all_s", t[0], "s")
        self.figures.add("compacted_partitions", len(stats), "partitions")

    # --- 4. sales: rollup router vs base --------------------------------------------------

    def pick_merchant(self) -> tuple[str, int]:
        """A mid-volume merchant: the one ranked at the 10th percentile from the top."""
        rows = self.reader.query(
            "SELECT merchant_id, sum(count) AS n FROM payments_daily GROUP BY 1 ORDER BY 2 DESC, 1"
        ).rows
        merchant, count = rows[len(rows) // 10]
        return str(merchant), int(count)

    def sales(self, merchant: str) -> None:
        end = self.day_start(self.active_day + 1)
        req = AggregateRequest(
            start=end - timedelta(days=LATE_WINDOW_DAYS),
            end=end,
            granularity="day",
            filters={"merchant_id": (merchant,)},
        )
        rolled, base = route(self.spec, req), route(self.spec, req, force_base=True)
        if rolled.source == "base" or base.source != "base":
            raise SystemExit(f"sales: unexpected routes {rolled.source!r}/{base.source!r}")
        answers, p99 = {}, {}
        for label, force in (("rollup", False), ("base", True)):
            # Routed, pruned to the partitions the range touches, executed: as the API does.
            def answer(force: bool = force) -> list[list[Any]]:
                return run(self.reader, self.spec, req, force_base=force)[1].rows

            answers[label] = answer()  # warm up
            times = repeat_ms(answer, self.scale.sales_reps)
            self.figures.add(f"sales_{label}_p50_ms", percentile(times, 50), "ms")
            p99[label] = self.figures.add(f"sales_{label}_p99_ms", percentile(times, 99), "ms")
        if answers["rollup"] != answers["base"]:
            raise SystemExit("sales: the rollup's answer differs from the base view's")
        self.log(f"sales: {rolled.source} vs base agree on {len(answers['base'])} days")
        self.figures.add("rollup_speedup", p99["base"] / max(p99["rollup"], 1e-9), "x")

    # --- 5. lookups ----------------------------------------------------------------------

    def lookups(self, merchant: str) -> None:
        known = self.reader.arrow(
            "SELECT txn_id, approved_at FROM payments WHERE merchant_id = ?", [merchant]
        )
        ids = known.column("txn_id").to_pylist()
        ds = self.spec.datasource
        parts = partitions_of(known.column("approved_at"), ds.granularity, ds.timezone).to_pylist()
        k = min(50, len(ids))
        times: list[float] = []
        for _ in range(self.scale.lookup_reps + 1):
            chosen = self.rng.sample(range(len(ids)), k)
            keys = [ids[i] for i in chosen]
            partitions = sorted({parts[i] for i in chosen})
            with stopwatch() as t:
                got = self.reader.lookup(DATASOURCE, keys, tenant=merchant, partitions=partitions)
            if got.num_rows != k:
                raise SystemExit(f"lookup: {got.num_rows} rows for {k} existing ids")
            times.append(1000 * t[0])
        times = times[1:]  # the first one warms the metadata cache
        self.figures.add("lookup_50_p50_ms", percentile(times, 50), "ms")
        self.figures.add("lookup_50_p99_ms", percentile(times, 99), "ms")

    # --- 6. fragmentation ------------------------------------------------------------------

    def hourly_sql(self, day: int) -> str:
        req = AggregateRequest(
            start=self.day_start(day), end=self.day_start(day + 1), granularity="hour"
        )
        return route(self.spec, req, force_base=True).sql("duckdb")

    def timed_query(self, sql: str) -> tuple[float, list[list[Any]]]:
        rows = self.reader.query(sql).rows  # warm up (view rebuild, metadata cache)
        times = repeat_ms(lambda: self.reader.query(sql), self.scale.fragment_reps)
        return percentile(times, 50), rows

    def _time(self, sql: str) -> float:
        with stopwatch() as t:
            self.reader.query(sql)
        return 1000 * t[0]

    def fragmentation(self) -> None:
        sc = self.scale
        target = self.active_day - 30
        twin = target - 7  # same weekday, similar volume, left unfragmented
        part = self.partition(target)
        lo, hi = self.day_start(target), self.day_start(target + 1)
        current = self.reader.arrow(
            "SELECT * FROM payments WHERE approved_at >= ? AND approved_at < ? "
            "AND status = 'DONE' ORDER BY txn_id",
            [lo, hi],
        )
        need = sc.fragments * sc.fragment_rows
        if current.num_rows < need:
            raise SystemExit(f"fragmentation: {part} has {current.num_rows} open payments")
        order = np.random.default_rng(SEED + 2).permutation(current.num_rows)[:need]
        current = current.take(pa.array(order))
        clock = self.clock
        times: list[float] = []
        for i in range(sc.fragments):
            clock += timedelta(seconds=1)
            rows = current.slice(i * sc.fragment_rows, sc.fragment_rows)
            cancels = cancellations_for(rows, clock, seed=SEED + 10_000 + i)
            times.append(1000 * self.commit(cancels, clock))
        self.clock = clock
        segments = next(
            s.segments for s in self.store.partition_stats(DATASOURCE) if s.partition == part
        )
        self.log(f"fragmentation: {part} has {segments} segments after {sc.fragments} commits")
        self.figures.add("fragment_segments", segments, "segments")
        self.figures.add("tiny_late_commit_p50_ms", percentile(times, 50), "ms")
        self.figures.add("tiny_late_commit_p99_ms", percentile(times, 99), "ms")
        sql = self.hourly_sql(target)
        ms, fragmented = self.timed_query(sql)
        self.figures.add("fragmented_query_ms", ms, "ms")
        with stopwatch() as t:
            self.store.compactor.compact(DATASOURCE, part)
        self.figures.add("compact_fragmented_s", t[0], "s")
        # The unfragmented twin and the compacted day, timed alternately in one reader
        # state so drift (caches, background I/O) hits both alike.
        twin_sql = self.hourly_sql(twin)
        compacted = self.reader.query(sql).rows
        self.reader.query(twin_sql)
        pairs = [(self._time(twin_sql), self._time(sql)) for _ in range(self.scale.fragment_reps)]
        unfragmented_ms = percentile([a for a, _ in pairs], 50)
        compacted_ms = percentile([b for _, b in pairs], 50)
        self.figures.add("unfragmented_query_ms", unfragmented_ms, "ms")
        self.figures.add("compacted_query_ms", compacted_ms, "ms")
        self.figures.add(
            "store_compacted_vs_unfragmented_ratio", compacted_ms / unfragmented_ms, "x"
        )
        if fragmented != compacted:
            raise SystemExit("fragmentation: compaction changed the answer")

    # --- totals ----------------------------------------------------------------------------

    def totals(self) -> None:
        rows = self.reader.query("SELECT count(*) FROM payments").rows[0][0]
        segments = self.store.live_segments()
        self.figures.add("stored_transactions", int(rows), "rows")
        self.figures.add("live_segments", len(segments), "segments")
        self.figures.add("stored_mb", sum(s.bytes for s in segments) / 2**20, "MB")
        self.figures.add("process_peak_rss_mb", peak_rss_mb(), "MB")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, help="keep the store here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp data dir")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    log = Log()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tally-bench-store-", dir="/tmp"))
    if args.data_dir and any(data_dir.glob("*")):
        raise SystemExit(f"{data_dir} is not empty; the benchmark needs a fresh store")
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"scale={args.scale} data_dir={data_dir}")
    bench = Bench(scale, data_dir, log)
    try:
        bench.load()
        bench.late()
        # Only the writer has worked so far: this peak is the writer's (key index included).
        bench.figures.add("writer_peak_rss_mb", peak_rss_mb(), "MB")
        bench.compact_all()
        merchant, count = bench.pick_merchant()
        log(f"merchant {merchant}: {count:,} payments")
        bench.figures.add("sales_merchant_payments", count, "rows")
        bench.sales(merchant)
        bench.lookups(merchant)
        bench.fragmentation()
        bench.totals()
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

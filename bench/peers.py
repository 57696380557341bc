"""Peer engines side by side: Tally's embedded store, DuckDB alone and chDB, one stream.

One process generates one list of payment-event batches (``producers.generate``:
duplicates redelivered, some versions emitted before their predecessors,
cancellations and partial cancellations hours to weeks after approval; then late
batches of 80% new payments and 20% cancellations of payments approved up to 90
days earlier, as ``bench/store.py``'s late phase) and feeds the same batches, in
the same order, to each engine on the same machine:

- **tally** — the OLAP sink's commit path without a broker: ``store.commit`` of
  each Arrow batch with the stream's ``now``, as ``bench/store.py`` does. It keeps
  the latest ``(version, event_id)`` per ``txn_id`` and maintains the rollups
  exactly (a replaced row's contribution is withdrawn). Sales go through the rollup
  router, lookups through ``reader.lookup`` with tenant and partitions.
- **duckdb** — what a user would build on DuckDB alone: a table with
  ``PRIMARY KEY (txn_id)``, each batch deduplicated to its latest version per key
  and upserted from Arrow with ``INSERT … ON CONFLICT (txn_id) DO UPDATE … WHERE``
  the incoming ``(version, event_id)`` is greater; plus an hourly aggregate table
  **recomputed for every hour the batch touched** (its rows' ``approved_at`` hours,
  which for a cancellation is the original approval's hour), in the same
  transaction. Recompute rather than delta because a delta needs each replaced
  row's old values read before the upsert and subtracted, which is the bookkeeping
  the engine does not give you; recompute is correct by construction and its cost
  (re-scanning every touched hour, up to 90 days back) is the price being measured.
- **chdb** — ClickHouse in-process (session API, data in a temporary directory on
  disk): a ``ReplacingMergeTree(version) ORDER BY txn_id`` table read with
  ``FINAL`` (ties on ``version`` are redelivered duplicates, identical rows, so the
  missing ``event_id`` tiebreak changes nothing here), and the textbook hourly
  rollup, a ``SummingMergeTree`` fed by a materialized view on the inserts. The
  view sums every version it sees — an approval and then its cancellation both
  count, and so does each redelivered duplicate — unless the producer sends sign
  rows that undo the previous version, which this event contract does not carry.
  Its rollup is therefore wrong, and the benchmark reports by how much rather than
  hiding it.

Every engine is checked against a reference computed independently in pyarrow
from the generated events: the latest ``(version, event_id)`` row per ``txn_id``,
recounted per hour, merchant, method, status and currency. Per engine: load
rows/s (rollup maintenance included), a 90-day by-day sales aggregate of one
mid-volume merchant from the rollup (p50/p99) and from the base rows (p99), 50-id
lookups (p50/p99), bytes on disk, and whether base rows, rollup and sales answer
equal the reference (with the rollup's summed |difference| in counts and amounts).

    .venv/bin/python bench/peers.py --scale small|full [--data-dir DIR] [--keep]

``--scale huge`` is refused: ``bench/keyindex.py --scale huge`` covers 100M keys.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import (
    Figures,
    Log,
    format_grid,
    max_time,
    percentile,
    repeat_ms,
    stopwatch,
    write_results,
)
from bench.store import DATASOURCE, LATE_SHARE, LATE_WINDOW_DAYS, SEED, START
from producers.generate import (
    GeneratorConfig,
    approval_tables,
    cancellations_for,
    generate_tables,
)
from rollups.request import AggregateRequest
from rollups.router import run
from storage import open_reader, open_store
from storage.calendar import partitions_of
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths

NAME = "peers"
ENGINES = ("tally", "duckdb", "chdb")
SEOUL = ZoneInfo("Asia/Seoul")
DIMS = ("merchant_id", "method", "status", "currency")
METRICS = ("count", "gross_amount", "canceled_amount")
LOOKUP_KEYS = 50
YES_NO = "yes/no"
HOW = {
    "tally": "store.commit of each Arrow batch; rollups kept exact by the commit",
    "duckdb": "PRIMARY KEY upsert (latest version, event_id tiebreak); hourly table recomputed "
    "for every hour a batch touched, in the batch's transaction",
    "chdb": "ReplacingMergeTree(version) read with FINAL; SummingMergeTree hourly rollup fed by "
    "a materialized view, which sums every version and redelivery (no sign rows)",
}


@dataclass(frozen=True)
class Scale:
    transactions: int  # payments approved over ``days`` (the stream's main phase)
    days: int
    merchants: int
    batch: int  # events per batch, every engine
    late_batches: int  # then: 80% new payments, 20% cancellations up to 90 days old
    sales_reps: int
    lookup_reps: int


SCALES = {
    # ≈ 52k events: 40k payments + 8k late new ones, their cancellations and redeliveries.
    "small": Scale(40_000, 120, 300, 2_000, 5, 30, 30),
    # 9.84M + 20 late batches × 8k new keys = 10M transactions (≈ 10.9M events).
    "full": Scale(9_840_000, 120, 5_000, 10_000, 20, 100, 100),
}
TINY = Scale(4_000, 100, 40, 500, 2, 3, 3)  # tests/bench/test_peers.py


# --- the stream and its reference -------------------------------------------------------


def stream(scale: Scale) -> list[tuple[pa.Table, datetime]]:
    """The batches every engine receives, each with the stream clock at its commit."""
    config = GeneratorConfig(
        transactions=scale.transactions,
        merchants=scale.merchants,
        days=scale.days,
        start=START,
        seed=SEED,
        drain=False,  # the late phase below plays the role of what comes after the window
    )
    batches = [(t, max_time(t, "occurred_at")) for t in generate_tables(config, scale.batch)]
    active = START + timedelta(days=scale.days)
    current = latest_rows(pa.concat_tables([t for t, _ in batches]))
    approved = current.column("approved_at")
    old = pc.and_(
        pc.greater_equal(approved, active - timedelta(days=LATE_WINDOW_DAYS)),
        pc.less(approved, active),
    )
    open_ = pc.less(current.column("canceled_amount"), current.column("amount"))
    candidates = current.filter(pc.and_(old, open_))
    late_rows = int(scale.batch * LATE_SHARE)
    order = np.random.default_rng(SEED + 1).permutation(candidates.num_rows)
    if len(order) < scale.late_batches * late_rows:
        raise SystemExit("stream: too few open payments in the late window")
    fresh = GeneratorConfig(
        transactions=scale.late_batches * (scale.batch - late_rows),
        merchants=scale.merchants,
        days=1,
        start=active,
        seed=SEED,
        first_seq=scale.transactions,  # ids continue the main phase's, never repeat them
    )
    for i, new in enumerate(approval_tables(fresh, scale.batch - late_rows)):
        if i >= scale.late_batches:
            break
        now = max_time(new, "approved_at")
        picked = candidates.take(pa.array(order[i * late_rows : (i + 1) * late_rows]))
        cancels = cancellations_for(picked, now, seed=SEED + i)
        batches.append((pa.concat_tables([new, cancels.select(new.schema.names)]), now))
    return batches


def latest_rows(events: pa.Table) -> pa.Table:
    """Each txn_id's row with the greatest (version, event_id), as the contract says."""
    order = pc.sort_indices(
        events, [("txn_id", "ascending"), ("version", "descending"), ("event_id", "descending")]
    )
    ranked = events.take(order)
    ids = ranked.column("txn_id").combine_chunks()
    first = np.ones(len(ids), dtype=bool)
    if len(ids) > 1:
        same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        first[1:] = ~same.to_numpy(zero_copy_only=False)
    return ranked.filter(pa.array(first))


def hourly_of(rows: pa.Table) -> pa.Table:
    """Count and amounts per (hour, merchant, method, status, currency) of ``rows``.
    A UTC hour is a Seoul hour: the offset is a whole number of hours."""
    hour = pc.floor_temporal(rows.column("approved_at"), unit="hour")
    table = pa.table(
        {
            "hour": pc.cast(hour, pa.int64()),
            **{d: rows.column(d) for d in DIMS},
            "amount": rows.column("amount"),
            "canceled_amount": rows.column("canceled_amount"),
        }
    )
    grouped = table.group_by(["hour", *DIMS]).aggregate(
        [("amount", "count"), ("amount", "sum"), ("canceled_amount", "sum")]
    )
    names = {"amount_count": "count", "amount_sum": "gross_amount"}
    names["canceled_amount_sum"] = "canceled_amount"
    return canonical_hourly(grouped.rename_columns([names.get(n, n) for n in grouped.schema.names]))


def canonical_hourly(table: pa.Table) -> pa.Table:
    """``hour`` as epoch microseconds, int64 metrics, sorted: comparable across engines."""
    hour = table.column("hour")
    if pa.types.is_timestamp(hour.type):
        hour = pc.cast(pc.cast(hour, pa.timestamp("us", tz="UTC")), pa.int64())
    out = pa.table(
        {
            "hour": hour,
            **{d: pc.cast(table.column(d), pa.string()) for d in DIMS},
            **{m: pc.cast(table.column(m), pa.int64()) for m in METRICS},
        }
    )
    return out.sort_by([("hour", "ascending")] + [(d, "ascending") for d in DIMS])


def rollup_diff(reference: pa.Table, got: pa.Table) -> dict[str, int]:
    """Summed |difference| per metric over every group either side has."""
    keys = ["hour", *DIMS]
    joined = reference.join(got, keys, join_type="full outer", right_suffix="_got")
    off: dict[str, int] = {}
    for m in METRICS:
        want = pc.fill_null(joined.column(m), 0)
        have = pc.fill_null(joined.column(f"{m}_got"), 0)
        off[m] = int(pc.sum(pc.abs(pc.subtract(want, have))).as_py() or 0)
    net_want = pc.subtract(
        pc.fill_null(joined.column("gross_amount"), 0),
        pc.fill_null(joined.column("canceled_amount"), 0),
    )
    net_have = pc.subtract(
        pc.fill_null(joined.column("gross_amount_got"), 0),
        pc.fill_null(joined.column("canceled_amount_got"), 0),
    )
    off["net_amount"] = int(pc.sum(pc.abs(pc.subtract(net_want, net_have))).as_py() or 0)
    return off


STATE = ("txn_id", "version", "status", "canceled_amount")


def same_state(reference: pa.Table, got: pa.Table) -> bool:
    """Do the engine's stored rows equal the reference's latest rows (key, version, state)?"""
    want = reference.select(STATE).sort_by("txn_id")
    have = got.select(STATE).cast(want.schema).sort_by("txn_id")
    return bool(want.equals(have))


Sales = dict[str, tuple[int, int]]  # Seoul day → (count, net amount)


def sales_of(rows: pa.Table, merchant: str, start: datetime, end: datetime) -> Sales:
    approved = rows.column("approved_at")
    mine = rows.filter(
        pc.and_(
            pc.equal(rows.column("merchant_id"), merchant),
            pc.and_(pc.greater_equal(approved, start), pc.less(approved, end)),
        )
    )
    local = pc.cast(mine.column("approved_at"), pa.timestamp("us", tz="Asia/Seoul"))
    table = pa.table(
        {
            "day": pc.strftime(local, format="%Y-%m-%d"),
            "net": pc.subtract(mine.column("amount"), mine.column("canceled_amount")),
        }
    )
    grouped = table.group_by("day").aggregate([("net", "count"), ("net", "sum")])
    return {
        str(d): (int(n), int(s))
        for d, n, s in zip(
            grouped.column("day").to_pylist(),
            grouped.column("net_count").to_pylist(),
            grouped.column("net_sum").to_pylist(),
            strict=True,
        )
    }


def as_sales(rows: list[list[Any]]) -> Sales:
    """Rows of (day, count, net) from an engine, the day as a date or a datetime."""
    out: Sales = {}
    for day, count, net in rows:
        if isinstance(day, datetime):
            day = day.astimezone(SEOUL) if day.tzinfo else day
            day = day.date()
        out[day.isoformat()] = (int(count), int(net))
    return out


@dataclass
class Reference:
    events: pa.Table
    latest: pa.Table
    hourly: pa.Table
    merchant: str
    sales_start: datetime
    sales_end: datetime
    sales: Sales
    lookups: list[tuple[list[str], list[str]]]  # (keys, their partitions) per repetition

    @classmethod
    def of(cls, batches: list[tuple[pa.Table, datetime]], scale: Scale, spec: Any) -> Reference:
        events = pa.concat_tables([t for t, _ in batches])
        latest = latest_rows(events)
        counts = latest.group_by("merchant_id").aggregate([("txn_id", "count")])
        ranked = sorted(
            zip(counts.column(0).to_pylist(), counts.column(1).to_pylist(), strict=True),
            key=lambda mc: (-mc[1], mc[0]),
        )
        merchant = str(ranked[len(ranked) // 10][0])  # 10th percentile from the top
        end = START + timedelta(days=scale.days + 1)
        start = end - timedelta(days=LATE_WINDOW_DAYS)
        mine = latest.filter(pc.equal(latest.column("merchant_id"), merchant))
        ids = mine.column("txn_id").to_pylist()
        ds = spec.datasource
        parts = partitions_of(mine.column("approved_at"), ds.granularity, ds.timezone).to_pylist()
        rng = random.Random(SEED)
        k = min(LOOKUP_KEYS, len(ids))
        lookups = []
        for _ in range(scale.lookup_reps + 1):  # the first warms each engine up
            chosen = rng.sample(range(len(ids)), k)
            lookups.append(([ids[i] for i in chosen], sorted({parts[i] for i in chosen})))
        return cls(
            events=events,
            latest=latest,
            hourly=hourly_of(latest),
            merchant=merchant,
            sales_start=start,
            sales_end=end,
            sales=sales_of(latest, merchant, start, end),
            lookups=lookups,
        )


# --- engines ------------------------------------------------------------------------------


class Engine(Protocol):
    name: str

    def load(self, batch: pa.Table, now: datetime) -> None: ...
    def settle(self) -> None: ...  # what runs after loading: compaction, checkpoint
    def latest(self) -> pa.Table: ...  # the stored rows, one per key (STATE columns)
    def hourly(self) -> pa.Table: ...  # the hourly rollup as the engine answers it
    def sales(self, merchant: str, start: datetime, end: datetime) -> list[list[Any]]: ...
    def sales_base(self, merchant: str, start: datetime, end: datetime) -> object: ...
    def lookup(self, merchant: str, keys: list[str], partitions: list[str]) -> int: ...
    def close(self) -> None: ...


class TallyEngine:
    name = "tally"

    def __init__(self, data_dir: Path) -> None:
        self.registry = SpecRegistry.load(builtin_spec_paths())
        self.spec: DatasourceSpec = self.registry.get(DATASOURCE)
        settings = Settings(data_dir=data_dir)
        store = open_store(settings, self.registry)
        assert isinstance(store, EmbeddedStore)
        self.store = store
        self.reader = open_reader(settings, self.registry)

    def load(self, batch: pa.Table, now: datetime) -> None:
        self.store.commit(DATASOURCE, batch, now=now)

    def settle(self) -> None:  # as the compaction watcher would, once caught up
        for s in self.store.partition_stats(DATASOURCE):
            if s.segments > 1:
                self.store.compactor.compact(s.datasource, s.partition)

    def latest(self) -> pa.Table:
        return self.reader.arrow(f"SELECT {', '.join(STATE)} FROM payments")  # noqa: S608

    def _run(self, req: AggregateRequest, force_base: bool = False) -> list[list[Any]]:
        return run(self.reader, self.spec, req, force_base=force_base)[1].rows

    def hourly(self) -> pa.Table:
        req = AggregateRequest(
            start=START - timedelta(days=1),
            end=START + timedelta(days=400),
            granularity="hour",
            group_by=DIMS,
        )
        rows = self._run(req)
        names = ["hour", *DIMS, *METRICS, "net_amount"]
        columns = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        types = {"hour": pa.timestamp("us", tz="UTC"), **dict.fromkeys(DIMS, pa.string())}
        return pa.table({n: pa.array(c, types.get(n, pa.int64())) for n, c in columns.items()})

    def _sales_request(self, merchant: str, start: datetime, end: datetime) -> AggregateRequest:
        filters = {"merchant_id": (merchant,)}
        return AggregateRequest(start=start, end=end, granularity="day", filters=filters)

    def sales(self, merchant: str, start: datetime, end: datetime) -> list[list[Any]]:
        rows = self._run(self._sales_request(merchant, start, end))
        return [[r[0], r[1], r[4]] for r in rows]  # bucket, count, net_amount

    def sales_base(self, merchant: str, start: datetime, end: datetime) -> object:
        return self._run(self._sales_request(merchant, start, end), force_base=True)

    def lookup(self, merchant: str, keys: list[str], partitions: list[str]) -> int:
        got = self.reader.lookup(DATASOURCE, keys, tenant=merchant, partitions=partitions)
        return int(got.num_rows)

    def close(self) -> None:
        self.reader.close()
        self.store.close()


def _columns_ddl(schema: pa.Schema, types: dict[str, str], nullable: Callable[[str], str]) -> str:
    kinds = {pa.string(): "string", pa.int64(): "int"}
    parts = []
    for f in schema:
        kind = "timestamp" if pa.types.is_timestamp(f.type) else kinds[f.type]
        parts.append(f"{f.name} {nullable(f.name) % types[kind]}")
    return ", ".join(parts)


HOURLY_SELECT = """
    {hour} AS hour, merchant_id, method, status, currency,
    count(*) AS count, sum(amount) AS gross_amount, sum({src}canceled_amount) AS canceled_amount,
    sum(amount - {src}canceled_amount) AS net_amount
"""


class DuckDBEngine:
    name = "duckdb"

    def __init__(self, data_dir: Path, schema: pa.Schema) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(data_dir / "payments.duckdb"))
        self.con.execute("SET TimeZone = 'UTC'")
        types = {"string": "VARCHAR", "int": "BIGINT", "timestamp": "TIMESTAMPTZ"}
        cols = _columns_ddl(schema, types, lambda _: "%s")
        self.con.execute(f"CREATE TABLE payments ({cols}, PRIMARY KEY (txn_id))")
        self.con.execute(
            "CREATE TABLE payments_hourly (hour TIMESTAMPTZ, merchant_id VARCHAR, "
            "method VARCHAR, status VARCHAR, currency VARCHAR, count BIGINT, "
            "gross_amount BIGINT, canceled_amount BIGINT, net_amount BIGINT)"
        )
        updates = ", ".join(f"{f.name} = excluded.{f.name}" for f in schema if f.name != "txn_id")
        # ON CONFLICT DO UPDATE may touch a row once per statement: latest per key first.
        self.upsert = f"""
            INSERT INTO payments SELECT * FROM batch
            QUALIFY row_number() OVER (
                PARTITION BY txn_id ORDER BY version DESC, event_id DESC) = 1
            ON CONFLICT (txn_id) DO UPDATE SET {updates}
            WHERE excluded.version > payments.version
               OR (excluded.version = payments.version AND excluded.event_id > payments.event_id)
        """  # noqa: S608 (column names from the schema)
        hourly = HOURLY_SELECT.format(hour="date_trunc('hour', approved_at)", src="")
        self.recompute = f"""
            INSERT INTO payments_hourly SELECT {hourly} FROM payments
            WHERE approved_at >= (SELECT min(hour) FROM touched)
              AND approved_at < (SELECT max(hour) FROM touched) + INTERVAL 1 HOUR
              AND date_trunc('hour', approved_at) IN (SELECT hour FROM touched)
            GROUP BY ALL
        """  # noqa: S608 (constants only)

    def load(self, batch: pa.Table, now: datetime) -> None:
        con = self.con
        con.register("batch", batch)
        try:
            con.execute("BEGIN")
            con.execute(self.upsert)
            con.execute(
                "CREATE OR REPLACE TEMP TABLE touched AS "
                "SELECT DISTINCT date_trunc('hour', approved_at) AS hour FROM batch"
            )
            con.execute("DELETE FROM payments_hourly WHERE hour IN (SELECT hour FROM touched)")
            con.execute(self.recompute)
            con.execute("COMMIT")
        finally:
            con.unregister("batch")

    def settle(self) -> None:
        self.con.execute("CHECKPOINT")

    def latest(self) -> pa.Table:
        return self.con.sql(f"SELECT {', '.join(STATE)} FROM payments").to_arrow_table()  # noqa: S608

    def hourly(self) -> pa.Table:
        return self.con.sql("SELECT * FROM payments_hourly").to_arrow_table()

    def _day_query(self, table: str, time: str, count: str, net: str) -> str:
        return f"""
            SELECT CAST(timezone('Asia/Seoul', {time}) AS DATE) AS day, {count}, {net}
            FROM {table} WHERE merchant_id = ? AND {time} >= ? AND {time} < ?
            GROUP BY 1 ORDER BY 1
        """  # noqa: S608 (constants only)

    def sales(self, merchant: str, start: datetime, end: datetime) -> list[list[Any]]:
        sql = self._day_query("payments_hourly", "hour", "sum(count)", "sum(net_amount)")
        return [list(r) for r in self.con.execute(sql, [merchant, start, end]).fetchall()]

    def sales_base(self, merchant: str, start: datetime, end: datetime) -> object:
        sql = self._day_query(
            "payments", "approved_at", "count(*)", "sum(amount - canceled_amount)"
        )
        return self.con.execute(sql, [merchant, start, end]).fetchall()

    def lookup(self, merchant: str, keys: list[str], partitions: list[str]) -> int:
        marks = ", ".join("?" * len(keys))
        sql = f"SELECT * FROM payments WHERE merchant_id = ? AND txn_id IN ({marks})"  # noqa: S608
        return len(self.con.execute(sql, [merchant, *keys]).fetchall())

    def close(self) -> None:
        self.con.close()


class ChdbEngine:
    name = "chdb"

    def __init__(self, data_dir: Path, schema: pa.Schema, spec: DatasourceSpec) -> None:
        from chdb import session

        data_dir.mkdir(parents=True, exist_ok=True)
        opener: Any = session.Session  # untyped: chdb ships no annotations
        self.session: Any = opener(str(data_dir))
        q = self.session.query
        types = {"string": "String", "int": "Int64", "timestamp": "DateTime64(6, 'UTC')"}
        cols = _columns_ddl(
            schema, types, lambda c: "Nullable(%s)" if spec.columns[c].nullable else "%s"
        )
        q("CREATE DATABASE IF NOT EXISTS bench")
        q(
            f"CREATE TABLE bench.payments ({cols}) "
            "ENGINE = ReplacingMergeTree(version) ORDER BY txn_id"
        )
        q(
            "CREATE TABLE bench.payments_hourly (hour DateTime('UTC'), merchant_id String, "
            "method String, status String, currency String, count Int64, gross_amount Int64, "
            "canceled_amount Int64, net_amount Int64) ENGINE = SummingMergeTree "
            "ORDER BY (merchant_id, hour, method, status, currency)"
        )
        hourly = HOURLY_SELECT.format(hour="toStartOfHour(approved_at)", src="p.")
        q(
            "CREATE MATERIALIZED VIEW bench.payments_hourly_mv TO bench.payments_hourly AS "  # noqa: S608
            f"SELECT {hourly} FROM bench.payments AS p GROUP BY ALL"
        )

    def load(self, batch: pa.Table, now: datetime) -> None:
        # Python(batch): chDB reads the local Arrow table named ``batch`` in place.
        self.session.query("INSERT INTO bench.payments SELECT * FROM Python(batch)")

    def settle(self) -> None:
        pass  # merges run in the background, as they would on a server

    def _arrow(self, sql: str, **params: Any) -> pa.Table:
        return self.session.query(sql, "ArrowTable", params=params or None)

    def latest(self) -> pa.Table:
        return self._arrow(f"SELECT {', '.join(STATE)} FROM bench.payments FINAL")  # noqa: S608

    def hourly(self) -> pa.Table:
        # Parts not merged yet hold partial sums: group again, as SummingMergeTree asks.
        got = self._arrow(
            "SELECT toDateTime64(hour, 6, 'UTC'), "  # noqa: S608 (constants only)
            f"{', '.join(DIMS)}, sum(count), sum(gross_amount), "
            "sum(canceled_amount) FROM bench.payments_hourly GROUP BY ALL"
        )
        return got.rename_columns(["hour", *DIMS, *METRICS])

    def _day_query(self, table: str, time: str, count: str, net: str) -> str:
        return f"""
            SELECT toDate({time}, 'Asia/Seoul') AS day, {count}, {net} FROM {table}
            WHERE merchant_id = {{m:String}}
              AND {time} >= toDateTime({{lo:Int64}}, 'UTC')
              AND {time} < toDateTime({{hi:Int64}}, 'UTC')
            GROUP BY day ORDER BY day
        """  # noqa: S608 (constants only)

    def _days(self, sql: str, merchant: str, start: datetime, end: datetime) -> list[list[Any]]:
        lo, hi = int(start.timestamp()), int(end.timestamp())
        table = self._arrow(sql, m=merchant, lo=lo, hi=hi)
        return [list(r.values()) for r in table.to_pylist()]

    def sales(self, merchant: str, start: datetime, end: datetime) -> list[list[Any]]:
        sql = self._day_query("bench.payments_hourly", "hour", "sum(count)", "sum(net_amount)")
        return self._days(sql, merchant, start, end)

    def sales_base(self, merchant: str, start: datetime, end: datetime) -> object:
        sql = self._day_query(
            "bench.payments FINAL", "approved_at", "count()", "sum(amount - canceled_amount)"
        )
        return self._days(sql, merchant, start, end)

    def lookup(self, merchant: str, keys: list[str], partitions: list[str]) -> int:
        ids = "[" + ",".join(f"'{k}'" for k in keys) + "]"  # generated ids: [a-z0-9_]
        got = self._arrow(
            "SELECT * FROM bench.payments FINAL "
            "WHERE merchant_id = {m:String} AND txn_id IN {ids:Array(String)}",
            m=merchant,
            ids=ids,
        )
        return int(got.num_rows)

    def close(self) -> None:
        self.session.close()


# --- the run ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one engine measured and answered (answers kept for the tests)."""

    figures: dict[str, float] = field(default_factory=dict)
    latest: pa.Table | None = None
    hourly: pa.Table | None = None
    off: dict[str, int] = field(default_factory=dict)


MEASURES = [
    ("load_rows_per_s", "rows/s"),
    ("settle_s", "s"),
    ("sales_p50_ms", "ms"),
    ("sales_p99_ms", "ms"),
    ("sales_base_p99_ms", "ms"),
    ("lookup_50_p50_ms", "ms"),
    ("lookup_50_p99_ms", "ms"),
    ("disk_mb", "MB"),
    ("base_exact", YES_NO),
    ("rollup_exact", YES_NO),
    ("rollup_count_off", "rows"),
    ("rollup_gross_off", "minor units"),
    ("rollup_net_off", "minor units"),
    ("sales_exact", YES_NO),
]


def measure(
    engine: Engine,
    batches: list[tuple[pa.Table, datetime]],
    ref: Reference,
    scale: Scale,
    data_dir: Path,
    log: Log,
) -> Outcome:
    out = Outcome()
    f = out.figures
    seconds, rows = 0.0, 0
    for batch, now in batches:
        with stopwatch() as t:
            engine.load(batch, now)
        seconds += t[0]
        rows += batch.num_rows
    f["load_rows_per_s"] = rows / seconds
    log(f"{engine.name}: loaded {rows:,} rows in {seconds:.1f}s")
    with stopwatch() as t:
        engine.settle()
    f["settle_s"] = t[0]
    m, lo, hi = ref.merchant, ref.sales_start, ref.sales_end
    answer = engine.sales(m, lo, hi)  # warm up
    times = repeat_ms(lambda: engine.sales(m, lo, hi), scale.sales_reps)
    f["sales_p50_ms"], f["sales_p99_ms"] = percentile(times, 50), percentile(times, 99)
    engine.sales_base(m, lo, hi)
    times = repeat_ms(lambda: engine.sales_base(m, lo, hi), scale.sales_reps)
    f["sales_base_p99_ms"] = percentile(times, 99)
    f["sales_exact"] = float(as_sales(answer) == ref.sales)
    times = []
    for keys, partitions in ref.lookups:
        with stopwatch() as t:
            found = engine.lookup(m, keys, partitions)
        if found != len(keys):
            raise SystemExit(f"{engine.name}: lookup found {found} rows for {len(keys)} ids")
        times.append(1000 * t[0])
    times = times[1:]  # the first one warmed caches up
    f["lookup_50_p50_ms"], f["lookup_50_p99_ms"] = percentile(times, 50), percentile(times, 99)
    f["disk_mb"] = disk_bytes(data_dir) / 2**20
    out.latest = engine.latest()
    f["base_exact"] = float(same_state(ref.latest, out.latest))
    out.hourly = canonical_hourly(engine.hourly())
    out.off = rollup_diff(ref.hourly, out.hourly)
    f["rollup_exact"] = float(not any(out.off.values()))
    f["rollup_count_off"] = out.off["count"]
    f["rollup_gross_off"] = out.off["gross_amount"]
    f["rollup_net_off"] = out.off["net_amount"]
    log(f"{engine.name}: rollup off by {out.off}")
    return out


def disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a merged-away part, just deleted
                total += (Path(root) / name).stat().st_size
    return total


def open_engine(name: str, data_dir: Path, schema: pa.Schema, spec: DatasourceSpec) -> Engine:
    if name == "tally":
        return TallyEngine(data_dir)
    if name == "duckdb":
        return DuckDBEngine(data_dir, schema)
    return ChdbEngine(data_dir, schema, spec)


def run_all(
    scale: Scale, work_dir: Path, log: Log, engines: tuple[str, ...] = ENGINES
) -> tuple[Figures, Reference, dict[str, Outcome]]:
    """Generate the stream once, feed it to every engine in turn, measure and check."""
    spec = SpecRegistry.load(builtin_spec_paths()).get(DATASOURCE)
    with stopwatch() as t:
        batches = stream(scale)
    ref = Reference.of(batches, scale, spec)
    figures = Figures()
    figures.add("events", ref.events.num_rows, "rows")
    figures.add("transactions", ref.latest.num_rows, "rows")
    figures.add("batches", len(batches), "batches")
    log(f"stream: {ref.events.num_rows:,} events, {len(batches)} batches in {t[0]:.1f}s")
    schema = batches[0][0].schema
    outcomes: dict[str, Outcome] = {}
    for name in engines:
        if name == "chdb" and not _has_chdb():
            for m, unit in MEASURES:
                figures.skip(f"{m}_chdb", unit, "chdb is not installed (pip install chdb)")
            continue
        engine = open_engine(name, work_dir / name, schema, spec)
        try:
            outcomes[name] = measure(engine, batches, ref, scale, work_dir / name, log)
        finally:
            engine.close()
        units = dict(MEASURES)
        for m, value in outcomes[name].figures.items():
            figures.add(f"{m}_{name}", value, units[m])
    return figures, ref, outcomes


def _has_chdb() -> bool:
    try:
        import chdb  # noqa: F401
    except ImportError:
        return False
    return True


def side_by_side(figures: Figures, engines: tuple[str, ...], title: str) -> str:
    """One row per measure, a column per engine; yes/no figures as words."""

    def cell(name: str, unit: str) -> Any:
        value = figures.value(name)
        return ("yes" if value else "no") if unit == YES_NO and value is not None else value

    rows = [(m, [cell(f"{m}_{e}", unit) for e in engines], unit) for m, unit in MEASURES]
    reasons = {f["name"].rsplit("_", 1)[1]: f["skipped"] for f in figures if "skipped" in f}
    notes = [f"{e}: skipped, {r}" for e, r in reasons.items()]
    return "\n".join([format_grid(rows, engines, title), *notes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    p.add_argument("--scale", choices=[*SCALES, "huge"], default="small")
    p.add_argument("--data-dir", type=Path, help="keep the engines' data here (default: temp)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp data dir")
    args = p.parse_args(argv)
    if args.scale == "huge":
        raise SystemExit("--scale huge is not run here: bench/keyindex.py covers 100M keys")
    log = Log()
    work = args.data_dir or Path(tempfile.mkdtemp(prefix="tally-bench-peers-", dir="/tmp"))
    if args.data_dir and any(work.glob("*")):
        raise SystemExit(f"{work} is not empty; the benchmark needs fresh engines")
    work.mkdir(parents=True, exist_ok=True)
    log(f"scale={args.scale} data_dir={work}")
    try:
        figures, ref, _ = run_all(SCALES[args.scale], work, log)
    finally:
        if args.data_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures.add("sales_merchant_payments", len(ref.latest.filter(_of(ref))), "rows")
    path = write_results(NAME, figures, args.scale, {"merchant": ref.merchant, "engines": HOW})
    print(side_by_side(figures, ENGINES, f"bench/{NAME} --scale {args.scale}"))
    log(f"wrote {path}")
    return 0


def _of(ref: Reference) -> pa.ChunkedArray:
    return pc.equal(ref.latest.column("merchant_id"), ref.merchant)


if __name__ == "__main__":
    sys.exit(main())

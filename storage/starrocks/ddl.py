"""StarRocks tables generated from a datasource spec (never hand-written).

* The datasource: a **Primary Key** table. Its key is the spec's key and ``_pt``, the
  start of the row's partition as wall-clock time in the spec's time zone (StarRocks'
  DATETIME has no zone, and its expression partitioning truncates in none), so
  ``PARTITION BY date_trunc(<granularity>, _pt)`` cuts the spec's calendar days, not
  UTC ones. The spec's time column keeps the instant, as UTC. ``ORDER BY (tenant,
  time)`` sorts each tablet for a merchant's time range; ``DISTRIBUTED BY HASH(key)``.
  A key's ``_pt`` never changes (a cancellation keeps its payment's time), so a key
  is one row, updated in place.
* Each rollup: an **Aggregate** table, ``bucket`` (UTC instant) and ``_pt`` (its
  rollup partition, wall clock) and the dimensions as the aggregate key, every metric
  ``BIGINT SUM``: loading a retraction delta adds to what is there.
* ``tally_offsets``: the OLAP sink's position per source partition, and the batch it
  is loading (``storage.starrocks.store``); ``tally_dead_letters``: the outbox;
  ``tally_partition_writes`` and ``tally_compactions``: what each partition received
  and when it was last compacted (the compaction watcher's figures).

Strings in a key are ``VARCHAR(128)``: StarRocks caps a primary key at 128 bytes; a
dead letter's message is ``VARCHAR(1048576)``, StarRocks' longest.
Each statement is checked by parsing it with sqlglot's ``starrocks`` dialect.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlglot
from sqlglot import exp

from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup
from tally.timeutil import Granularity, bucket_range

PT = "_pt"  # partition start, wall clock in the spec's zone
BUCKET = "bucket"
OFFSETS = "tally_offsets"
DEAD_LETTERS = "tally_dead_letters"
WRITES = "tally_partition_writes"
COMPACTIONS = "tally_compactions"
KEY_BYTES = 128
KEY_VARCHAR = f"VARCHAR({KEY_BYTES})"
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_TYPES = {"int": "BIGINT", "bool": "BOOLEAN", "timestamp": "DATETIME", "string": "VARCHAR(65533)"}


@dataclass(frozen=True)
class Statement:
    table: str  # the table it creates ("" for the database)
    kind: str  # database | primary_key | aggregate | offsets | dead_letters
    sql: str


def utc_text(value: datetime) -> str:
    """An aware instant as the UTC DATETIME text Tally stores."""
    return value.astimezone(UTC).strftime(DATETIME_FORMAT)


def wall(value: datetime, spec: DatasourceSpec) -> str:
    """The wall-clock time in the spec's zone of an aware instant (``_pt``)."""
    return value.astimezone(spec.tz).replace(tzinfo=None).strftime(DATETIME_FORMAT)


def q(name: str) -> str:
    """An identifier, quoted as StarRocks quotes it."""
    return exp.to_identifier(name, quoted=True).sql("starrocks")


def table_ref(settings: Settings, table: str) -> str:
    return f"{q(settings.starrocks.database)}.{q(table)}"


def base_table(settings: Settings, spec: DatasourceSpec) -> str:
    """The datasource's table: its name, as SQL names it (``starrocks.database``
    separates deployments, as the data directory does for the embedded engine)."""
    return spec.name


def rollup_table(settings: Settings, rollup: Rollup) -> str:
    return rollup.name


def table_of(settings: Settings, spec: DatasourceSpec, rollup: Rollup | None) -> str:
    """The table of a datasource (``rollup`` None) or of one of its rollups."""
    return base_table(settings, spec) if rollup is None else rollup_table(settings, rollup)


def partition_pt(spec: DatasourceSpec, granularity: Granularity, partition: str) -> str:
    """The ``_pt`` value of a partition key (``2026-11-05``): its start, wall clock."""
    start, _end = bucket_range(partition, granularity, spec.tz)
    return wall(start, spec)


def _properties(settings: Settings, **extra: str) -> str:
    props = {"replication_num": str(settings.starrocks.replication_num), **extra}
    return ", ".join(f'"{k}" = "{v}"' for k, v in props.items())


def _column(name: str, typ: str, nullable: bool, agg: str = "", default: str = "") -> str:
    """StarRocks' order: name, type, aggregate, nullability, default."""
    null = "NULL" if nullable else "NOT NULL"
    tail = f' DEFAULT "{default}"' if default else ""
    return f"  {q(name)} {typ}{agg} {null}{tail}"


def base_ddl(settings: Settings, spec: DatasourceSpec) -> Statement:
    ds = spec.datasource
    sr = settings.starrocks
    cols = [_column(ds.key, KEY_VARCHAR, False), _column(PT, "DATETIME", False)]
    for name, column in spec.columns.items():
        if name == ds.key:
            continue
        typ = KEY_VARCHAR if name == ds.tenant else _TYPES[column.type]
        cols.append(_column(name, typ, column.nullable))
    table = base_table(settings, spec)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table_ref(settings, table)} (\n"
        + ",\n".join(cols)
        + f"\n) PRIMARY KEY ({q(ds.key)}, {q(PT)})\n"
        f"PARTITION BY date_trunc('{ds.granularity}', {q(PT)})\n"
        f"DISTRIBUTED BY HASH({q(ds.key)}) BUCKETS {sr.buckets}\n"
        f"ORDER BY ({q(ds.tenant)}, {q(ds.time)})\n"
        f"PROPERTIES ({_properties(settings, enable_persistent_index='true')})"
    )
    return Statement(table, "primary_key", sql)


def rollup_ddl(settings: Settings, spec: DatasourceSpec, rollup: Rollup) -> Statement:
    sr = settings.starrocks
    keys = [BUCKET, PT, *rollup.dimensions]
    cols = [_column(BUCKET, "DATETIME", False), _column(PT, "DATETIME", False)]
    for dim in rollup.dimensions:
        column = spec.columns[dim]
        typ = KEY_VARCHAR if column.type == "string" else _TYPES[column.type]
        cols.append(_column(dim, typ, column.nullable))
    for metric in spec.parsed_metrics:
        cols.append(_column(metric.name, "BIGINT", False, " SUM", "0"))
    table = rollup_table(settings, rollup)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table_ref(settings, table)} (\n"
        + ",\n".join(cols)
        + f"\n) AGGREGATE KEY ({', '.join(q(k) for k in keys)})\n"
        f"PARTITION BY date_trunc('{rollup.partition}', {q(PT)})\n"
        f"DISTRIBUTED BY HASH({q(spec.datasource.tenant)}) BUCKETS {sr.buckets}\n"
        f"PROPERTIES ({_properties(settings)})"
    )
    return Statement(table, "aggregate", sql)


def _small_table(settings: Settings, table: str, kind: str, cols: list[str], key: str) -> Statement:
    """One of Tally's own bookkeeping tables: one bucket, keyed as ``key`` says."""
    first = key.split("(", 1)[1].split(",")[0].strip(" )`")
    sql = (
        f"CREATE TABLE IF NOT EXISTS {table_ref(settings, table)} (\n"
        + ",\n".join(cols)
        + f"\n) {key}\n"
        f"DISTRIBUTED BY HASH({q(first)}) BUCKETS 1\n"
        f"PROPERTIES ({_properties(settings)})"
    )
    return Statement(table, kind, sql)


def offsets_ddl(settings: Settings) -> Statement:
    cols = [
        _column("slot", "VARCHAR(64)", False),  # sha1 of datasource, topic, partition
        _column("datasource", "VARCHAR(255)", False),
        _column("topic", "VARCHAR(255)", False),
        _column("partition", "INT", False),
        _column("committed", "BIGINT", False),
        _column("pending_batch", "VARCHAR(128)", True),  # the batch being loaded, if any
        _column("pending_ranges", "VARCHAR(65533)", True),  # its ranges, JSON
        _column("pending_at", "DATETIME", True),
        _column("updated_at", "DATETIME", False),
        _column("log_id", "VARCHAR(64)", True),  # the source topic's id the offset is of
        _column("reset_note", "VARCHAR(1024)", True),  # the operator's last reset
    ]
    key = f"PRIMARY KEY ({q('slot')})"
    return _small_table(settings, OFFSETS, "offsets", cols, key)


def dead_letters_ddl(settings: Settings) -> Statement:
    cols = [
        _column("slot", "VARCHAR(64)", False),  # sha1 of the letter's id
        _column("id", "VARCHAR(65533)", False),
        _column("datasource", "VARCHAR(255)", False),
        _column("sink", "VARCHAR(64)", False),
        _column("topic", "VARCHAR(255)", False),
        _column("partition", "INT", False),
        _column("offset", "BIGINT", False),
        _column("key_b64", "VARCHAR(1048576)", True),
        _column("value_b64", "VARCHAR(1048576)", True),
        _column("reason", "VARCHAR(1048576)", False),
        _column("failed_at", "DOUBLE", False),
        _column("published", "BOOLEAN", False),
    ]
    key = f"PRIMARY KEY ({q('slot')})"
    return _small_table(settings, DEAD_LETTERS, "dead_letters", cols, key)


def writes_ddl(settings: Settings) -> Statement:
    """What each partition received: summed per load, so a batch's row is labelled
    with it; each load is one version of the partition's tablets (what a compaction
    merges), so ``loads`` is StarRocks' counterpart of the embedded segments."""
    cols = [
        _column("datasource", "VARCHAR(64)", False),
        _column("partition", "VARCHAR(32)", False),
        _column("loads", "BIGINT", False, " SUM", "0"),
        _column("rows", "BIGINT", False, " SUM", "0"),
        _column("late_rows", "BIGINT", False, " SUM", "0"),
        _column("last_write_at", "DATETIME", False, " MAX"),
    ]
    key = f"AGGREGATE KEY ({q('datasource')}, {q('partition')})"
    return _small_table(settings, WRITES, "partition_writes", cols, key)


def compactions_ddl(settings: Settings) -> Statement:
    """The last compaction Tally asked for per partition, and the write counts it
    covered (late rows since = the sums now minus these)."""
    cols = [
        _column("slot", "VARCHAR(64)", False),
        _column("datasource", "VARCHAR(64)", False),
        _column("partition", "VARCHAR(32)", False),
        _column("loads_seen", "BIGINT", False),
        _column("rows_seen", "BIGINT", False),
        _column("late_rows_seen", "BIGINT", False),
        _column("compacted_at", "DATETIME", False),
    ]
    key = f"PRIMARY KEY ({q('slot')})"
    return _small_table(settings, COMPACTIONS, "compactions", cols, key)


def statements(settings: Settings, specs: list[DatasourceSpec]) -> list[Statement]:
    """Everything ``tally starrocks apply`` creates, in order, each parse-checked."""
    db = settings.starrocks.database
    out = [Statement("", "database", f"CREATE DATABASE IF NOT EXISTS {q(db)}")]
    for spec in specs:
        out.append(base_ddl(settings, spec))
        out.extend(rollup_ddl(settings, spec, r) for r in spec.rollups)
    out += [offsets_ddl(settings), dead_letters_ddl(settings)]
    out += [writes_ddl(settings), compactions_ddl(settings)]
    for st in out:
        check(st.sql)
    return out


def check(sql: str) -> exp.Expr:
    """The statement as sqlglot's ``starrocks`` dialect parses it (it raises on
    anything it cannot parse, so a malformed statement never reaches StarRocks)."""
    return sqlglot.parse_one(sql, read="starrocks")

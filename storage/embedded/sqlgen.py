"""SQL for the embedded engine, built as sqlglot trees.

File paths and identifiers come from the catalog and the spec, never from users,
but they still go through sqlglot literals and identifiers so quoting is never
hand-made. The same builders feed the reader's views and the compactor.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlglot import exp

from storage.embedded.segments import DELETED
from storage.schema import BUCKET
from storage.sql import col, subquery, timestamp
from tally.specs import DatasourceSpec, Rollup

DIALECT = "duckdb"  # the embedded engine renders every tree for DuckDB
_DUCK_TYPES = {"string": "VARCHAR", "int": "BIGINT", "timestamp": "TIMESTAMPTZ", "bool": "BOOLEAN"}


def read_parquet(paths: Sequence[str]) -> exp.Expression:
    files = exp.Array(expressions=[exp.Literal.string(p) for p in paths])
    return exp.Anonymous(this="read_parquet", expressions=[files])


def _from_files(paths: Sequence[str]) -> exp.Select:
    return exp.select(exp.Star()).from_(exp.Table(this=read_parquet(paths)))


@dataclass(frozen=True)
class Read:
    """A segment file to read, whole — or, for a pack (one file holding several cold
    partitions), only the time range [start, end) of the partition read from it."""

    path: str
    start: datetime | None = None
    end: datetime | None = None


def split_reads(
    parts: Mapping[str, Sequence[str]],
    packed: Container[str],
    bounds: Callable[[str], tuple[datetime, datetime]],
) -> tuple[list[Read], list[Read]]:
    """(clean, dirty) reads of partitions → files: a partition in one segment is clean
    (deduplicated by construction), the files of the others need deduplication."""
    clean: list[Read] = []
    dirty: list[Read] = []
    for part, paths in parts.items():
        reads = [Read(p, *bounds(part)) if p in packed else Read(p) for p in paths]
        (clean if len(paths) == 1 else dirty).extend(reads)
    return clean, dirty


def scan(reads: Sequence[Read], time_column: str, *, filename: bool = False) -> exp.Select:
    """Every row of ``reads``: whole files in one ``read_parquet``, each pack once with
    the ranges read from it (adjacent ranges merged) as a filter on ``time_column``."""
    whole = list(dict.fromkeys(r.path for r in reads if r.start is None))
    ranges: dict[str, list[tuple[datetime, datetime]]] = {}
    for r in reads:
        if r.start is not None and r.end is not None:
            ranges.setdefault(r.path, []).append((r.start, r.end))
    parts: list[exp.Select] = []
    if whole:
        parts.append(_files(whole, filename))
    for path, spans in ranges.items():
        merged: list[list[datetime]] = []
        for lo, hi in sorted(set(spans)):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        t = col(time_column)
        inside = exp.or_(
            *(
                exp.and_(
                    exp.GTE(this=t.copy(), expression=timestamp(lo)),
                    exp.LT(this=t.copy(), expression=timestamp(hi)),
                )
                for lo, hi in merged
            )
        )
        parts.append(_files([path], filename).where(inside))
    if not parts:
        raise ValueError("scan of no segments")
    if len(parts) == 1:
        return parts[0]
    union: exp.Expression = parts[0]
    for part in parts[1:]:
        union = exp.union(union, part, distinct=False)
    return exp.select(exp.Star()).from_(subquery(union, "u"))


def _files(paths: Sequence[str], filename: bool) -> exp.Select:
    call = read_parquet(paths)
    if filename:
        assert isinstance(call, exp.Anonymous)
        call.append("expressions", exp.EQ(this=exp.column("filename"), expression=exp.true()))
    return exp.select(exp.Star()).from_(exp.Table(this=call))


def empty_relation(columns: Sequence[tuple[str, str]]) -> exp.Select:
    """A typed relation with no rows, for datasources that have no segments yet."""
    projections = [
        exp.alias_(exp.cast(exp.Null(), _DUCK_TYPES[typ]), exp.to_identifier(name, quoted=True))
        for name, typ in columns
    ]
    return exp.select(*projections).where(exp.false())


def base_columns(spec: DatasourceSpec) -> list[tuple[str, str]]:
    return [(n, c.type) for n, c in spec.columns.items()]


def dedup(spec: DatasourceSpec, relation: exp.Select) -> exp.Select:
    """Latest (version, event_id) per key. Tenant leads the window's partition so
    tenant filters push below the window (a key never changes tenant in a
    partition: the writer tombstones it instead)."""
    ds = spec.datasource
    window = exp.Window(
        this=exp.RowNumber(),
        partition_by=[col(ds.tenant), col(ds.key)],
        order=exp.Order(
            expressions=[
                exp.Ordered(this=col(ds.version), desc=True),
                exp.Ordered(this=col(ds.event_id), desc=True),
                # A tombstone shares (version, event_id) with the row that moved away;
                # when both meet in one window the live row must win.
                exp.Ordered(this=col(DELETED)),
            ]
        ),
    )
    return relation.qualify(exp.EQ(this=window, expression=exp.Literal.number(1)))


def merged_base(
    spec: DatasourceSpec, clean: Sequence[Read], dirty: Sequence[Read]
) -> exp.Expression:
    """The merged view: live rows only, latest version per key.

    ``clean`` reads belong to partitions with a single segment (already deduplicated
    by construction) and are scanned directly; ``dirty`` ones are deduplicated.
    """
    names = [n for n, _ in base_columns(spec)]
    projection = [col(n) for n in names]
    time_column = spec.datasource.time
    parts: list[exp.Select] = []
    if clean:
        parts.append(
            exp.select(*projection)
            .from_(scan(clean, time_column).subquery("c"))
            .where(exp.not_(col(DELETED)))
        )
    if dirty:
        inner = dedup(spec, exp.select(exp.Star()).from_(scan(dirty, time_column).subquery("s")))
        parts.append(
            exp.select(*projection).from_(inner.subquery("d")).where(exp.not_(col(DELETED)))
        )
    if not parts:
        return empty_relation(base_columns(spec))
    out: exp.Expression = parts[0]
    for part in parts[1:]:
        out = exp.union(out, part, distinct=False)
    return out


def rollup_columns(spec: DatasourceSpec, rollup: Rollup) -> list[tuple[str, str]]:
    dims = [(d, spec.columns[d].type) for d in rollup.dimensions]
    return [(BUCKET, "timestamp"), *dims, *((m.name, "int") for m in spec.parsed_metrics)]


def raw_relation(columns: Sequence[tuple[str, str]], paths: Sequence[str]) -> exp.Expression:
    return _from_files(paths) if paths else empty_relation(columns)


def merged_rollup(spec: DatasourceSpec, rollup: Rollup, paths: Sequence[str]) -> exp.Expression:
    """Deltas summed per (bucket, dimensions); groups that net to zero are hidden."""
    if not paths:
        return empty_relation(rollup_columns(spec, rollup))
    keys = [col(BUCKET), *(col(d) for d in rollup.dimensions)]
    sums = [
        exp.alias_(exp.Sum(this=col(m.name)), exp.to_identifier(m.name, quoted=True))
        for m in spec.parsed_metrics
    ]
    nonzero = exp.or_(
        *(
            exp.NEQ(this=exp.Sum(this=col(m.name)), expression=exp.Literal.number(0))
            for m in spec.parsed_metrics
        )
    )
    return (
        exp.select(*keys, *sums)
        .from_(exp.Table(this=read_parquet(paths)))
        .group_by(*keys)
        .having(nonzero)
    )


def compaction_query(
    spec: DatasourceSpec, rollup: Rollup | None, reads: Sequence[Read], *, drop_tombstones: bool
) -> str:
    """One deduplicated (base) or summed (rollup) relation replacing ``reads``."""
    if rollup is not None:
        return merged_rollup(spec, rollup, [r.path for r in reads]).sql(dialect=DIALECT)
    source = exp.select(exp.Star()).from_(scan(reads, spec.datasource.time).subquery("s"))
    query = dedup(spec, source)
    if drop_tombstones:
        query = exp.select(exp.Star()).from_(query.subquery("d")).where(exp.not_(col(DELETED)))
    return query.sql(dialect=DIALECT)


def pack_query(spec: DatasourceSpec, reads: Sequence[Read]) -> str:
    """The rows of single-segment partitions, for one pack. Their tombstones are
    dropped: in a partition of one segment they hide nothing."""
    return (
        exp.select(exp.Star())
        .from_(scan(reads, spec.datasource.time).subquery("s"))
        .where(exp.not_(col(DELETED)))
        .sql(dialect=DIALECT)
    )

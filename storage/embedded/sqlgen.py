"""SQL for the embedded engine, built as sqlglot trees.

File paths and identifiers come from the catalog and the spec, never from users,
but they still go through sqlglot literals and identifiers so quoting is never
hand-made. The same builders feed the reader's views and the compactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlglot import exp

from storage.embedded.segments import BUCKET, DELETED
from tally.specs import DatasourceSpec, Rollup

DIALECT = "duckdb"
_DUCK_TYPES = {"string": "VARCHAR", "int": "BIGINT", "timestamp": "TIMESTAMPTZ", "bool": "BOOLEAN"}


def col(name: str) -> exp.Column:
    return exp.column(exp.to_identifier(name, quoted=True))


def bucket_expr(column: exp.Expression, granularity: str, timezone: str) -> exp.Expression:
    """Start of the calendar bucket in ``timezone`` containing ``column``, as an instant."""
    zone = exp.Literal.string(timezone)
    local = exp.Anonymous(this="timezone", expressions=[zone, column])
    truncated = exp.Anonymous(
        this="date_trunc", expressions=[exp.Literal.string(granularity), local]
    )
    return exp.Anonymous(this="timezone", expressions=[zone.copy(), truncated])


def timestamp(value: datetime) -> exp.Expression:
    """An aware instant as a TIMESTAMPTZ literal (its offset kept)."""
    return exp.cast(exp.Literal.string(value.isoformat()), "TIMESTAMPTZ")


def subquery(relation: exp.Expression, alias: str) -> exp.Subquery:
    return exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier(alias)))


def read_parquet(paths: Sequence[str]) -> exp.Expression:
    files = exp.Array(expressions=[exp.Literal.string(p) for p in paths])
    return exp.Anonymous(this="read_parquet", expressions=[files])


def _from_files(paths: Sequence[str]) -> exp.Select:
    return exp.select(exp.Star()).from_(exp.Table(this=read_parquet(paths)))


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


def merged_base(spec: DatasourceSpec, clean: Sequence[str], dirty: Sequence[str]) -> exp.Expression:
    """The merged view: live rows only, latest version per key.

    ``clean`` files belong to partitions with a single segment (already deduplicated
    by construction) and are scanned directly; ``dirty`` ones are deduplicated.
    """
    names = [n for n, _ in base_columns(spec)]
    projection = [col(n) for n in names]
    parts: list[exp.Select] = []
    if clean:
        parts.append(
            exp.select(*projection)
            .from_(exp.Table(this=read_parquet(clean)))
            .where(exp.not_(col(DELETED)))
        )
    if dirty:
        inner = dedup(spec, _from_files(dirty))
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
    spec: DatasourceSpec, rollup: Rollup | None, paths: Sequence[str], *, drop_tombstones: bool
) -> str:
    """One deduplicated (base) or summed (rollup) relation replacing ``paths``."""
    if rollup is not None:
        return merged_rollup(spec, rollup, paths).sql(dialect=DIALECT)
    query = dedup(spec, _from_files(paths))
    if drop_tombstones:
        query = exp.select(exp.Star()).from_(query.subquery("d")).where(exp.not_(col(DELETED)))
    return query.sql(dialect=DIALECT)

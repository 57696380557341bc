"""The merged base relation on Druid, built as a sqlglot tree (rendered ``tallydruid``).

Druid holds every row the supervisor ingested: duplicates, older versions, late
cancellations beside their payments. The merge keeps exactly the latest
(version, event_id) per key with a window function::

    SELECT <spec columns> FROM (
      SELECT *, ROW_NUMBER() OVER (PARTITION BY tenant, key
                                   ORDER BY version DESC, event_id DESC) AS rank
      FROM <datasource> WHERE __time >= start AND __time < end [AND pushed filters])
    WHERE rank = 1

Why a window and not the other two techniques (tried on Druid 33 here; the figures
are in the reader's docstring and ADR 0005): Druid 33 plans it natively — a scan (the time
range becomes the scan's intervals, so only those segments are read) feeding a
``windowOperator`` on the broker — and it is exact for both halves of the order.
``LATEST_BY(col, version)`` per key would break ties between two events of one
version arbitrarily (``event_id`` is a string, no long rank orders it), and a join on
a grouped ``MAX(version)`` keeps exact duplicates (same event redelivered) twice and
needs a second join for the tie. The cost is the broker's: the rows of the range are
materialised there (``druid.max_subquery_rows`` bounds it), which the reader keeps
small by reading only the partitions a request touches.

Druid 33 quirk: the window over an unfiltered scan of all the table's columns does
not plan (HTTP 501); the inner query always carries ``key IS NOT NULL``.

Filters on the window's partition columns (tenant, key) commute with it, so
``lookup`` pushes them inside, below the window; filters on other columns cannot go
there (a newer version failing the filter would let an older one through).

Columns come back named and typed as the spec declares: ``__time`` is the spec's
partition-time column again; other timestamp columns were written as epoch millis by
the relay (``storage.refined``) and are turned back into TIMESTAMPs; booleans (0/1)
into booleans.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlglot import exp

from storage.deltas import BUCKET
from storage.refined import column_kinds
from storage.sql import col, subquery, timestamp
from tally.specs import DatasourceSpec, Rollup

TIME = "__time"
RANK = "__tally_rank"
_DRUID_TYPES = {"string": "VARCHAR", "int": "BIGINT", "timestamp": "TIMESTAMP", "bool": "BOOLEAN"}


def projection(spec: DatasourceSpec) -> list[exp.Expression]:
    """The spec's columns from Druid's stored ones, in spec order."""
    ds = spec.datasource
    column_kinds(spec)  # every column has a refined kind, so a Druid column
    out: list[exp.Expression] = []
    for name, column in spec.columns.items():
        alias = exp.to_identifier(name, quoted=True)
        value: exp.Expression
        if name == ds.time:
            value = col(TIME)
        elif column.type == "timestamp":
            value = exp.Anonymous(this="MILLIS_TO_TIMESTAMP", expressions=[col(name)])
        elif column.type == "bool":
            value = exp.EQ(this=col(name), expression=exp.Literal.number(1))
        else:
            out.append(col(name))
            continue
        out.append(exp.alias_(value, alias))  # type: ignore[arg-type]
    return out


def time_range(start: datetime | None, end: datetime | None) -> list[exp.Expression]:
    out: list[exp.Expression] = []
    if start is not None:
        out.append(exp.GTE(this=col(TIME), expression=timestamp(start)))
    if end is not None:
        out.append(exp.LT(this=col(TIME), expression=timestamp(end)))
    return out


def merged(
    spec: DatasourceSpec,
    datasource: str,
    start: datetime | None = None,
    end: datetime | None = None,
    pushed: Sequence[exp.Expression] = (),
) -> exp.Select:
    """Latest (version, event_id) per key of ``datasource`` within [start, end);
    ``pushed``: conditions on tenant and key only (they commute with the window)."""
    ds = spec.datasource
    window = exp.Window(
        this=exp.RowNumber(),
        partition_by=[col(ds.tenant), col(ds.key)],
        order=exp.Order(
            expressions=[
                exp.Ordered(this=col(ds.version), desc=True),
                exp.Ordered(this=col(ds.event_id), desc=True),
            ]
        ),
    )
    inner = exp.select(exp.Star(), exp.alias_(window, exp.to_identifier(RANK, quoted=True))).from_(
        exp.Table(this=exp.to_identifier(datasource, quoted=True))
    )
    # The key is never null; the condition is there for Druid 33's planner, which
    # cannot plan this window over a bare scan of every column of the table
    # ("Unhandled Query Planning Failure": Calcite's CannotPlanException) but plans
    # it over any filtered scan.
    present = exp.Not(this=exp.Is(this=col(ds.key), expression=exp.Null()))
    inner = inner.where(exp.and_(*time_range(start, end), *pushed, present))
    return (
        exp.select(*projection(spec))
        .from_(subquery(inner, "r"))
        .where(exp.EQ(this=col(RANK), expression=exp.Literal.number(1)))
    )


def rollup_rows(
    spec: DatasourceSpec,
    rollup: Rollup,
    datasource: str,
    start: datetime | None = None,
    end: datetime | None = None,
    pushed: Sequence[exp.Expression] = (),
) -> exp.Select:
    """A rollup datasource's rows as the router reads every rollup: ``bucket``, the
    dimensions, one summable column per metric (callers sum: Druid may hold several
    rows of one group, from several tasks' segments)."""
    table = exp.Table(this=exp.to_identifier(datasource, quoted=True))
    query = exp.select(
        exp.alias_(col(TIME), exp.to_identifier(BUCKET, quoted=True)),
        *(col(d) for d in rollup.dimensions),
        *(col(m.name) for m in spec.parsed_metrics),
    ).from_(table)
    conditions = [*time_range(start, end), *pushed]
    return query.where(exp.and_(*conditions)) if conditions else query


def empty_rollup(spec: DatasourceSpec, rollup: Rollup) -> exp.Select:
    """A rollup's columns, typed, and no rows: a rollup Druid does not serve yet."""
    columns = {BUCKET: "timestamp"} | {d: spec.columns[d].type for d in rollup.dimensions}
    return _no_rows(columns | {m.name: "int" for m in spec.parsed_metrics})


def empty(spec: DatasourceSpec) -> exp.Select:
    """The spec's columns, typed, and no rows: a datasource Druid does not serve yet."""
    return _no_rows({n: c.type for n, c in spec.columns.items()})


def _no_rows(columns: dict[str, str]) -> exp.Select:
    projections = [
        exp.alias_(exp.cast(exp.Null(), _DRUID_TYPES[t]), exp.to_identifier(n, quoted=True))
        for n, t in columns.items()
    ]
    # Druid needs a FROM for a WHERE: one inline row, filtered out.
    one = exp.values([(exp.Literal.number(1),)], alias="v", columns=["x"])
    never = exp.EQ(this=exp.Literal.number(1), expression=exp.Literal.number(0))
    return exp.select(*projections).from_(one).where(never)

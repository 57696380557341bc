"""Dialect-neutral SQL pieces, built as sqlglot trees, that every engine renders.

Callers above the storage layer (the rollup router, the query API, the verifier)
build queries from these and hand the tree to a backend, which renders it in its
own dialect (``Capabilities.sql_dialect``): no SQL text is ever concatenated from
user input.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlglot import exp


def col(name: str) -> exp.Column:
    return exp.column(exp.to_identifier(name, quoted=True))


def bucket_expr(column: exp.Expression, granularity: str, timezone: str) -> exp.Expression:
    """Start of the calendar bucket in ``timezone`` containing ``column``, as an instant:
    the instant's local time in the zone, truncated, read back in the zone.

    Built from sqlglot's own nodes (``AtTimeZone`` around ``TimestampTrunc``), which
    DuckDB and Postgres render as ``DATE_TRUNC('DAY', x AT TIME ZONE z) AT TIME ZONE z``
    and Druid (``tallydruid``) as ``TIME_FLOOR(x, 'P1D', NULL, z)``. Not a zoned
    ``TimestampTrunc``: sqlglot gives that BigQuery's meaning, where the zone is
    ignored below a day, and an hour of a half-hour zone (Asia/Kolkata) would move."""
    zone = exp.Literal.string(timezone)
    local = exp.AtTimeZone(this=column, zone=zone)
    truncated = exp.TimestampTrunc(this=local, unit=exp.var(granularity.upper()))
    return exp.AtTimeZone(this=truncated, zone=zone.copy())


def timestamp(value: datetime) -> exp.Expression:
    """An aware instant as a TIMESTAMPTZ literal (its offset kept)."""
    return exp.cast(exp.Literal.string(value.isoformat()), "TIMESTAMPTZ")


def subquery(relation: exp.Expression, alias: str) -> exp.Subquery:
    return exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier(alias)))


def every_row(relation: exp.Expression) -> exp.Select:
    """``SELECT *`` over a reader's relation (a datasource merged, a rollup's rows)."""
    return exp.select(exp.Star()).from_(subquery(relation, "r"))


def summed(relation: exp.Expression, keys: Sequence[str], metrics: Sequence[str]) -> exp.Select:
    """A rollup relation's groups, each metric summed: an engine may hold several rows
    of one group (Druid's segments of several tasks, its signed deltas)."""
    sums = [exp.alias_(exp.Sum(this=col(m)), exp.to_identifier(m, quoted=True)) for m in metrics]
    return (
        exp.select(*(col(k) for k in keys), *sums)
        .from_(subquery(relation, "r"))
        .group_by(*(exp.Literal.number(i + 1) for i in range(len(keys))))
    )


def group_by_all_as_positions(node: exp.Expr) -> exp.Expr:
    """``GROUP BY ALL`` (DuckDB's, Snowflake's) as the positions of the projections
    that aggregate nothing, for engines whose parser has no ``ALL`` there (a sqlglot
    ``transforms.preprocess`` step of a dialect's ``Select``)."""
    group = node.args.get("group") if isinstance(node, exp.Select) else None
    if group is None or not group.args.get("all"):
        return node
    positions = [
        exp.Literal.number(i + 1)
        for i, projection in enumerate(node.expressions)
        if not projection.find(exp.AggFunc)
    ]
    node = node.copy()
    node.set("group", exp.Group(expressions=positions) if positions else None)
    return node

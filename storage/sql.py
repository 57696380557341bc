"""Dialect-neutral SQL pieces, built as sqlglot trees, that every engine renders.

Callers above the storage layer (the rollup router, the query API, the verifier)
build queries from these and hand the tree to a backend, which renders it in its
own dialect (``Capabilities.sql_dialect``): no SQL text is ever concatenated from
user input.
"""

from __future__ import annotations

from datetime import datetime

from sqlglot import exp


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

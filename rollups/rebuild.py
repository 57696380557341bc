"""Recompute rollups from the merged base and repair any difference.

The repair is itself a delta: for each group, ``expected − stored`` is written as
one more rollup segment in a single catalog transaction, so a repair is atomic,
cheap, and leaves the normal retraction machinery untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlglot import exp

from storage.embedded.sqlgen import (
    DIALECT,
    Read,
    bucket_expr,
    col,
    merged_base,
    raw_relation,
    rollup_columns,
    subquery,
    timestamp,
)
from tally.specs import DatasourceSpec, Rollup


@dataclass
class RebuildReport:
    rollup: str
    partition: str | None
    groups_repaired: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)  # first few, for humans

    def as_dict(self) -> dict[str, Any]:
        return {
            "rollup": self.rollup,
            "partition": self.partition,
            "groups_repaired": self.groups_repaired,
            "differences": self.differences,
        }


def repair_query(
    spec: DatasourceSpec,
    rollup: Rollup,
    base_clean: Sequence[Read],
    base_dirty: Sequence[Read],
    rollup_paths: Sequence[str],
    start: datetime | None,
    end: datetime | None,
) -> str:
    """Rows of ``expected − stored`` for every group where they differ."""
    dims = list(rollup.dimensions)
    metrics = spec.parsed_metrics
    tcol = spec.datasource.time

    def in_range(column: str) -> exp.Condition:
        conds: list[exp.Expression] = [exp.true()]
        if start is not None:
            conds.append(exp.GTE(this=col(column), expression=timestamp(start)))
        if end is not None:
            conds.append(exp.LT(this=col(column), expression=timestamp(end)))
        return exp.and_(*conds)

    bucket = bucket_expr(col(tcol), rollup.granularity, spec.datasource.timezone)
    expected = (
        exp.select(
            exp.alias_(bucket, "bucket"),
            *(col(d) for d in dims),
            *(exp.alias_(m.aggregate_sql(), m.name) for m in metrics),
        )
        .from_(subquery(merged_base(spec, base_clean, base_dirty), "b"))
        .where(in_range(tcol))
        .group_by(*(exp.Literal.number(i + 1) for i in range(1 + len(dims))))
    )
    stored_keys = [col("bucket"), *(col(d) for d in dims)]
    stored = (
        exp.select(*stored_keys, *(exp.alias_(exp.Sum(this=col(m.name)), m.name) for m in metrics))
        .from_(subquery(raw_relation(rollup_columns(spec, rollup), rollup_paths), "r"))
        .where(in_range("bucket"))
        .group_by(*stored_keys)
    )
    on = exp.and_(
        *(
            exp.NullSafeEQ(this=exp.column(k, "e"), expression=exp.column(k, "s"))
            for k in ["bucket", *dims]
        )
    )

    def delta(name: str) -> exp.Expression:
        zero = exp.Literal.number(0)
        return exp.Sub(
            this=exp.Coalesce(this=exp.column(name, "e"), expressions=[zero]),
            expression=exp.Coalesce(this=exp.column(name, "s"), expressions=[zero.copy()]),
        )

    projections = [
        exp.alias_(exp.Coalesce(this=exp.column(k, "e"), expressions=[exp.column(k, "s")]), k)
        for k in ["bucket", *dims]
    ] + [exp.alias_(exp.cast(delta(m.name), "BIGINT"), m.name) for m in metrics]
    differs = exp.or_(
        *(exp.NEQ(this=delta(m.name), expression=exp.Literal.number(0)) for m in metrics)
    )
    query = (
        exp.select(*projections)
        .from_(expected.subquery("e"))
        .join(stored.subquery("s"), on=on, join_type="FULL OUTER")
        .where(differs)
        .order_by(exp.Literal.number(1))
    )
    return query.sql(dialect=DIALECT)

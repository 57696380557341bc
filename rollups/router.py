"""Answer an aggregate from the coarsest rollup that can answer it exactly.

A rollup answers a request exactly when every grouped or filtered column is one of
its dimensions, the requested granularity is a whole number of its buckets, and the
time range starts and ends on its bucket boundaries. Among those, the one with the
coarsest buckets and then the fewest dimensions has the fewest rows to scan.
Otherwise the request falls back to the merged base view. Either way the answer has
the same shape and the route says where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from sqlglot import exp

from rollups.evaluate import evaluate
from rollups.request import AggregateRequest
from storage.protocol import OlapReader, QueryResult
from storage.sql import bucket_expr, col, subquery, timestamp
from tally.errors import RoutingError
from tally.specs import DatasourceSpec, Rollup
from tally.timeutil import GRANULARITIES, coarser_or_equal, is_aligned

BASE = "base"


@dataclass(frozen=True)
class Route:
    """Where a request is answered from; its SQL is built only when asked for."""

    spec: DatasourceSpec
    request: AggregateRequest
    rollup: Rollup | None

    @property
    def source(self) -> str:  # rollup name or "base"
        return BASE if self.rollup is None else self.rollup.name

    @cached_property
    def query(self) -> exp.Select:
        return _query(self.spec, self.request, self.rollup)

    def sql(self, dialect: str) -> str:
        return self.query.sql(dialect=dialect)


def validate(spec: DatasourceSpec, req: AggregateRequest) -> None:
    if req.start.tzinfo is None or req.end.tzinfo is None:
        raise RoutingError("from and to must carry a time zone offset")
    if req.end <= req.start:
        raise RoutingError("'to' must be after 'from'")
    for name in (*req.group_by, *req.filters):
        if name not in spec.columns or spec.columns[name].type != "string":
            raise RoutingError(f"{name!r} is not a dimension of {spec.name}")
    if len(set(req.group_by)) != len(req.group_by):
        raise RoutingError("group_by repeats a column")


def can_answer(spec: DatasourceSpec, rollup: Rollup, req: AggregateRequest) -> bool:
    dims = set(rollup.dimensions)
    return (
        set(req.group_by) <= dims
        and set(req.filters) <= dims
        and coarser_or_equal(req.granularity, rollup.granularity)
        and is_aligned(req.start, rollup.granularity, spec.tz)
        and is_aligned(req.end, rollup.granularity, spec.tz)
    )


def choose(spec: DatasourceSpec, req: AggregateRequest) -> Rollup | None:
    candidates = [r for r in spec.rollups if can_answer(spec, r, req)]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda r: (-GRANULARITIES.index(r.granularity), len(r.dimensions), r.name),
    )


def route(spec: DatasourceSpec, req: AggregateRequest, *, force_base: bool = False) -> Route:
    validate(spec, req)
    return Route(spec, req, None if force_base else choose(spec, req))


def _query(spec: DatasourceSpec, req: AggregateRequest, rollup: Rollup | None) -> exp.Select:
    metrics = spec.parsed_metrics
    groups = [col(g) for g in req.group_by]
    if rollup is None:
        table, time_col = exp.to_table(spec.name, quoted=True), spec.datasource.time
        sums = [m.aggregate_sql() for m in metrics]
    else:
        table = exp.Table(this=exp.to_identifier(rollup.name, quoted=True), db="raw")
        time_col = "bucket"
        sums = [exp.Sum(this=col(m.name)) for m in metrics]
    bucket: exp.Expression = col(time_col)
    if rollup is None or rollup.granularity != req.granularity:
        bucket = bucket_expr(bucket, req.granularity, spec.datasource.timezone)
    projections = (
        [exp.alias_(bucket, "bucket")]
        + groups
        + [
            exp.alias_(
                exp.cast(exp.Coalesce(this=s, expressions=[exp.Literal.number(0)]), "BIGINT"),
                m.name,
            )
            for s, m in zip(sums, metrics, strict=True)
        ]
    )
    conditions: list[exp.Expression] = [
        exp.GTE(this=col(time_col), expression=timestamp(req.start)),
        exp.LT(this=col(time_col), expression=timestamp(req.end)),
    ]
    for name, values in sorted(req.filters.items()):
        conditions.append(col(name).isin(*(exp.Literal.string(v) for v in values)))
    positions = [exp.Literal.number(i + 1) for i in range(1 + len(groups))]
    query = (
        exp.select(*projections)
        .from_(table)
        .where(exp.and_(*conditions))
        .group_by(*positions)
        .order_by(*positions)
    )
    if rollup is not None:
        count = next(m for m in metrics if m.kind == "count")
        query = query.having(
            exp.NEQ(this=exp.Sum(this=col(count.name)), expression=exp.Literal.number(0))
        )
    return query


def bind(routed: Route, relation: exp.Expression) -> exp.Select:
    """Read the routed query from ``relation`` (e.g. partition-pruned files) instead of
    the named view: a pure rewrite of the FROM clause."""
    query = routed.query.copy()
    return query.from_(subquery(relation, "src"), copy=False)


def run(
    reader: OlapReader, spec: DatasourceSpec, req: AggregateRequest, *, force_base: bool = False
) -> tuple[Route, QueryResult]:
    """Route, prune to the partitions the range touches, execute. Engines holding
    rollups in memory hand over the few rows the request needs, summed in Arrow."""
    stored = reader.capabilities.rollup_datasources
    routed = route(spec, req, force_base=force_base or not stored)
    if routed.rollup is not None and reader.capabilities.resident_rollups:
        tenants = req.filters.get(spec.datasource.tenant)
        state = reader.rollup_state(routed.rollup.name, req.start, req.end, tenants)
        return routed, evaluate(spec, routed.rollup, req, state)
    name = spec.name if routed.source == BASE else routed.source
    tenants = req.filters.get(spec.datasource.tenant)
    relation = reader.relation(name, req.start, req.end, tenants=tenants)
    sql = bind(routed, relation).sql(dialect=reader.capabilities.sql_dialect)
    return routed, reader.query(sql)

"""Answer a routed rollup request from resident rollup state, in Arrow.

Engines that keep rollups in memory (``Capabilities.resident_rollups``) hand the
router the summable rows of the partitions and tenants a request touches — for a
dashboard, a few hundred rows. Planning SQL over them would cost more than the
arithmetic, so the router filters, re-buckets, groups and sums them here. The result
has exactly the shape and order of the SQL the router would otherwise run
(``router.route``): bucket, group-by columns, metrics; groups whose count nets to
zero are hidden; ordered by bucket then group-by columns. Tests hold the two paths
to the same answers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rollups.request import AggregateRequest
from storage.protocol import QueryResult
from tally.specs import DatasourceSpec, Rollup
from tally.timeutil import utc_datetimes


def evaluate(
    spec: DatasourceSpec, rollup: Rollup, req: AggregateRequest, state: pa.Table
) -> QueryResult:
    metrics = [m.name for m in spec.parsed_metrics]
    count = next(m.name for m in spec.parsed_metrics if m.kind == "count")
    bucket = state.column("bucket")
    mask = pc.and_(pc.greater_equal(bucket, _scalar(req.start)), pc.less(bucket, _scalar(req.end)))
    for name, values in req.filters.items():
        mask = pc.and_(mask, pc.is_in(state.column(name), value_set=pa.array(list(values))))
    rows = state.filter(mask)
    if req.granularity != rollup.granularity:
        rows = rows.set_column(0, "bucket", _rebucket(rows.column("bucket"), req, spec))
    keys = ["bucket", *req.group_by]
    out = rows.group_by(keys, use_threads=False).aggregate([(m, "sum") for m in metrics])
    out = out.select([*keys, *(f"{m}_sum" for m in metrics)]).rename_columns([*keys, *metrics])
    out = out.filter(pc.not_equal(out.column(count), 0))
    out = out.sort_by([(k, "ascending") for k in keys])
    data: list[list[Any]] = [utc_datetimes(out.column(0))]
    data += [out.column(c).to_pylist() for c in out.column_names[1:]]
    return QueryResult(out.column_names, [list(r) for r in zip(*data, strict=True)])


def _scalar(ts: datetime) -> pa.Scalar:
    return pa.scalar(ts, pa.timestamp("us", tz="UTC"))


def _rebucket(column: pa.ChunkedArray, req: AggregateRequest, spec: DatasourceSpec) -> Any:
    """Start of the calendar bucket in the datasource's zone, as a UTC instant (the
    same as ``sqlgen.bucket_expr``): arrow rounds zoned timestamps in local time."""
    local = column.cast(pa.timestamp("us", tz=spec.datasource.timezone))
    floored = pc.floor_temporal(local, unit=req.granularity)
    return floored.cast(pa.timestamp("us", tz="UTC"))

"""Retraction deltas: what one commit changes in a rollup.

For every key whose stored state changes from ``old`` (maybe none) to ``new``, the
rollup receives ``contribution(new) − contribution(old)``. The commit passes new
states with sign +1 and replaced states with sign −1; this sums them per (bucket,
dimensions). Summing the deltas of any sequence of commits equals aggregating the
latest state of every key, because every metric is a count or an integer sum.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from storage.calendar import buckets_of
from tally.specs import DatasourceSpec, Rollup

SIGN = "_sign"
BUCKET = "bucket"


def signed_deltas(spec: DatasourceSpec, rollup: Rollup, signed: pa.Table) -> pa.Table:
    """Deltas per (bucket, *dimensions) from states carrying a ``_sign`` column.

    Groups that net to zero on every metric (a key re-sent with an unchanged
    contribution) are dropped: they would change nothing.
    """
    ds = spec.datasource
    sign = signed.column(SIGN)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        BUCKET: buckets_of(signed.column(ds.time), rollup.granularity, ds.timezone)
    }
    for dim in rollup.dimensions:
        columns[dim] = signed.column(dim)
    names = [m.name for m in spec.parsed_metrics]
    for metric in spec.parsed_metrics:
        columns[metric.name] = pc.multiply_checked(metric.evaluate_arrow(signed), sign)
    keys = [BUCKET, *rollup.dimensions]
    grouped = (
        pa.table(columns).group_by(keys, use_threads=False).aggregate([(n, "sum") for n in names])
    )
    grouped = grouped.rename_columns(
        [
            c.removesuffix("_sum") if c.endswith("_sum") and c[:-4] in names else c
            for c in grouped.column_names
        ]
    )
    nonzero = pc.not_equal(grouped.column(names[0]), 0)
    for name in names[1:]:
        nonzero = pc.or_(nonzero, pc.not_equal(grouped.column(name), 0))
    return grouped.filter(nonzero)

"""Retraction deltas: what one commit changes in a rollup.

For every key whose stored state changes from ``old`` (maybe none) to ``new``, the
rollup receives ``contribution(new) − contribution(old)``. The commit passes new
states with sign +1 and replaced states with sign −1; this sums them per (bucket,
dimensions). Summing the deltas of any sequence of commits equals aggregating the
latest state of every key, because every metric is a count or an integer sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.calendar import buckets_of
from tally.specs import DatasourceSpec, Rollup

SIGN = "_sign"
BUCKET = "bucket"
_US = pa.timestamp("us", tz="UTC")


def latest_in_batch(spec: DatasourceSpec, table: pa.Table) -> pa.Table:
    """Keep the greatest (version, event_id) per key within the batch."""
    ds = spec.datasource
    if table.num_rows <= 1:
        return table
    if pc.count_distinct(table.column(ds.key)).as_py() == table.num_rows:
        return table  # the usual case: nothing to deduplicate, skip the sort
    ordered = table.sort_by(
        [(ds.key, "ascending"), (ds.version, "descending"), (ds.event_id, "descending")]
    )
    keys = ordered.column(ds.key).combine_chunks()
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), first]))


def signed_states(
    spec: DatasourceSpec,
    added: pa.Table,
    retracted: pa.Table | Sequence[Sequence[Any]] | None,
) -> pa.Table:
    """New states (``added``: the ``spec.rollup_state_columns`` of each accepted row)
    with sign +1, and the states they replace with sign −1: the input of
    ``signed_deltas``. ``retracted`` is a table of the same columns, or tuples in
    their order with the time as epoch microseconds (the row-wise key states)."""
    signed = added.append_column(SIGN, pa.repeat(pa.scalar(1, pa.int64()), added.num_rows))
    if retracted is None or not len(retracted):
        return signed
    old = (
        retracted.cast(added.schema)
        if isinstance(retracted, pa.Table)
        else _state_rows(spec, added.schema, retracted)
    )
    minus = old.append_column(SIGN, pa.repeat(pa.scalar(-1, pa.int64()), old.num_rows))
    return pa.concat_tables([signed, minus])


def _state_rows(spec: DatasourceSpec, schema: pa.Schema, rows: Sequence[Sequence[Any]]) -> pa.Table:
    columns = zip(*rows, strict=True)
    arrays = [
        pa.array(values, pa.int64()).cast(_US)
        if name == spec.datasource.time
        else pa.array(values, schema.field(name).type)
        for name, values in zip(schema.names, columns, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


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

"""Planning one commit: the pure, vectorised part between "batch in" and "files out".

Given a batch (Arrow), the writer's key index and the clock, decide which rows are
newer than what is stored (version guard), where they go (partitions by event
time, never arrival time), which tombstones hide keys that moved partition or
tenant, and the rollup deltas that retract each replaced state and add the new one.
Per-row Python work is one dict probe and one tuple; the rest is Arrow and DuckDB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from storage.calendar import partitions_of
from storage.deltas import latest_in_batch, signed_deltas, signed_states
from storage.embedded.keyindex import KeyIndex, Resolver
from storage.embedded.segments import (
    DELETED,
    PendingSegment,
    base_schema,
    base_sort_keys,
    rollup_sort_keys,
)
from storage.schema import rollup_schema
from tally.specs import DatasourceSpec
from tally.timeutil import bucket_range

_PART = "_p"


def _no_update() -> None:
    return None


@dataclass
class CommitPlan:
    segments: list[PendingSegment] = field(default_factory=list)
    # Applies the batch to the key index; run once the commit is durable.
    index_update: Callable[[], None] = _no_update
    rows_written: int = 0
    partition_stats: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    stale: int = 0
    tombstones: int = 0
    rollup_rows: int = 0
    partitions: tuple[str, ...] = ()


def plan_commit(
    spec: DatasourceSpec,
    batch: pa.Table,
    index: KeyIndex,
    late_before_us: int,
    resolve: Resolver,
) -> CommitPlan:
    ds = spec.datasource
    plan = CommitPlan()
    table = latest_in_batch(spec, batch)
    new = index.encode(table)
    slots = index.find(new["h1"], new["h2"])
    stored = index.gather(slots, ["version", "eprefix", "ehash"])

    def tie(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        keys = table.column(ds.key).take(pa.array(rows)).to_pylist()
        ids = table.column(ds.event_id).take(pa.array(rows)).to_pylist()
        where = index.partitions(slots.take(rows)).to_pylist()
        exact = resolve(spec, keys, sorted(set(where)))
        return np.array([k not in exact or e > exact[k][1] for k, e in zip(keys, ids, strict=True)])

    accept = index.newer(new, slots, stored, tie)
    accepted = int(accept.sum())
    plan.stale = batch.num_rows - accepted
    if not accepted:
        return plan
    if accepted != table.num_rows:
        table = table.filter(pa.array(accept))
        new = {name: values[accept] for name, values in new.items()}
        slots = slots.take(accept)

    times = table.column(ds.time)
    part_array = partitions_of(times, ds.granularity, ds.timezone)
    state_cols = spec.rollup_state_columns if spec.rollups else ()
    replacing = slots.found
    old = slots.take(replacing)
    tombstones: pa.Table | None = None
    retracted: pa.Table | None = None
    if replacing.any():
        old_parts = index.partitions(old)
        old_tenants = index.tenants(old)
        mine = pa.array(replacing)
        moved = pc.or_(
            pc.not_equal(old_parts, part_array.filter(mine)),
            pc.not_equal(old_tenants, table.column(ds.tenant).filter(mine)),
        )
        if state_cols:
            retracted = index.state_table(old, table.select(list(state_cols)).schema)
        if pc.any(moved).as_py():
            tombstones = _tombstones(
                spec,
                table.filter(mine).filter(moved),
                old_parts.filter(moved),
                old_tenants.filter(moved),
                index.gather(old, [f"s:{ds.time}"])[f"s:{ds.time}"][np.asarray(moved, np.bool_)],
            )
    plan.tombstones = 0 if tombstones is None else tombstones.num_rows
    plan.rows_written = table.num_rows
    plan.index_update = lambda: index.update(slots, new)

    _plan_base(spec, plan, table, part_array, tombstones)
    _plan_stats(spec, plan, part_array, times, late_before_us)
    if spec.rollups:
        _plan_rollups(spec, plan, table, retracted, state_cols)
    return plan


def _plan_base(
    spec: DatasourceSpec,
    plan: CommitPlan,
    table: pa.Table,
    part_array: pa.Array,
    tombstones: pa.Table | None,
) -> None:
    """One presorted segment per partition: sort once, slice without copying."""
    schema = base_schema(spec)
    table = _conform(table, schema)
    if tombstones is not None:
        part_array = pa.concat_arrays([part_array, tombstones.column(_PART).combine_chunks()])
        table = pa.concat_tables([table, tombstones.drop_columns([_PART])])
    table = table.append_column(_PART, part_array)
    table = table.sort_by([(_PART, "ascending"), *base_sort_keys(spec)])
    sorted_parts = table.column(_PART).combine_chunks()
    table = table.drop_columns([_PART])
    counts = pc.value_counts(sorted_parts)
    offset = 0
    names: list[str] = []
    # value_counts keeps first-appearance order, which is sorted order here.
    for partition, count in zip(
        counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
    ):
        plan.segments.append(PendingSegment(spec.name, partition, table.slice(offset, count), None))
        names.append(partition)
        offset += count
    plan.partitions = tuple(names)


def _plan_stats(
    spec: DatasourceSpec,
    plan: CommitPlan,
    part_array: pa.Array,
    times: pa.ChunkedArray,
    late_before_us: int,
) -> None:
    """Late rows (writes into partitions older than the active window) and newest event."""
    ds = spec.datasource
    micros = pc.cast(times, pa.int64())
    grouped = (
        pa.table({"p": part_array, "t": micros})
        .group_by("p")
        .aggregate([("t", "max"), ("t", "count")])
    )
    for partition, newest_us, count in zip(
        grouped.column("p").to_pylist(),
        grouped.column("t_max").to_pylist(),
        grouped.column("t_count").to_pylist(),
        strict=True,
    ):
        _start, end = _bounds(partition, ds.granularity, ds.timezone)
        late = count if end.timestamp() * 1e6 <= late_before_us else 0
        plan.partition_stats[partition] = (late, newest_us / 1e6)


@cache
def _bounds(partition: str, granularity: Any, timezone: str) -> tuple[datetime, datetime]:
    from zoneinfo import ZoneInfo

    return bucket_range(partition, granularity, ZoneInfo(timezone))


def _plan_rollups(
    spec: DatasourceSpec,
    plan: CommitPlan,
    table: pa.Table,
    retracted: pa.Table | None,
    state_cols: tuple[str, ...],
) -> None:
    signed = signed_states(spec, table.select(list(state_cols)), retracted)
    for rollup in spec.rollups:
        result = signed_deltas(spec, rollup, signed)
        if not result.num_rows:
            continue
        result = _conform(result, rollup_schema(spec, rollup))
        parts = partitions_of(result.column("bucket"), rollup.partition, spec.datasource.timezone)
        sort = rollup_sort_keys(spec, rollup)
        for partition in sorted(set(parts.to_pylist())):
            rows = result.filter(pc.equal(parts, partition))
            plan.segments.append(PendingSegment(rollup.name, partition, rows, sort))
        plan.rollup_rows += result.num_rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in schema order and type; a missing ``_deleted`` becomes false."""
    if DELETED in schema.names and DELETED not in table.column_names:
        table = table.append_column(DELETED, pa.array([False] * table.num_rows))
    return table.select(schema.names).cast(schema)


def _tombstones(
    spec: DatasourceSpec,
    moved: pa.Table,
    old_parts: pa.Array,
    old_tenants: pa.Array,
    old_times_us: npt.NDArray[np.int64],
) -> pa.Table:
    """Rows hiding keys where they used to live: each key's new (version, event_id),
    its old tenant and time, ``_deleted`` set; ``_p`` names the old partition."""
    ds = spec.datasource
    schema = base_schema(spec)
    n = moved.num_rows
    given: dict[str, pa.Array | pa.ChunkedArray] = {
        ds.key: moved.column(ds.key),
        ds.version: moved.column(ds.version),
        ds.event_id: moved.column(ds.event_id),
        ds.tenant: old_tenants,
        ds.time: pa.array(old_times_us, pa.int64()).cast(schema.field(ds.time).type),
        DELETED: pa.repeat(pa.scalar(True), n),
    }
    arrays = [
        given[f.name].cast(f.type) if f.name in given else pa.nulls(n, f.type) for f in schema
    ]
    columns = pa.Table.from_arrays(arrays, schema=schema)
    return columns.append_column(_PART, old_parts)

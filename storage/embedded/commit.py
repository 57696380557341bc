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
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import compress
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.calendar import partitions_of
from storage.deltas import latest_in_batch, signed_deltas, signed_states
from storage.embedded.keyindex import Entry, KeyIndex
from storage.embedded.segments import (
    DELETED,
    PendingSegment,
    base_schema,
    base_sort_keys,
    rollup_sort_keys,
    to_table,
)
from storage.schema import rollup_schema
from tally.specs import DatasourceSpec
from tally.timeutil import bucket_range

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PART = "_p"


def _no_updates() -> list[tuple[str, Entry]]:
    return []


@dataclass
class CommitPlan:
    segments: list[PendingSegment] = field(default_factory=list)
    # The key index's new entries, built on demand: the store builds them while the
    # segment files are being written, overlapping this Python work with disk I/O.
    index_updates: Callable[[], list[tuple[str, Entry]]] = _no_updates
    rows_written: int = 0
    partition_stats: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    stale: int = 0
    tombstones: int = 0
    rollup_rows: int = 0
    partitions: tuple[str, ...] = ()


def _shared_strings(array: pa.ChunkedArray | pa.Array, index: KeyIndex) -> list[str]:
    """to_pylist, but equal values share one (interned) string object."""
    encoded = pc.dictionary_encode(array)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    values = [index.intern(v) for v in encoded.dictionary.to_pylist()]
    return [values[i] for i in encoded.indices.to_pylist()]


def plan_commit(
    spec: DatasourceSpec,
    batch: pa.Table,
    index: KeyIndex,
    late_before_us: int,
) -> CommitPlan:
    ds = spec.datasource
    plan = CommitPlan()
    table = latest_in_batch(spec, batch)
    keys = table.column(ds.key).to_pylist()
    versions = table.column(ds.version).to_pylist()
    event_ids = table.column(ds.event_id).to_pylist()
    # The version guard, written so the common case (new keys) stays in C loops.
    olds: list[Entry | None] = list(map(index.entries.get, keys))
    accept = [
        old is None or (version, event_id) > (old[0], old[1])
        for old, version, event_id in zip(olds, versions, event_ids, strict=True)
    ]
    previous = list(compress(olds, accept))  # one per accepted row
    plan.stale = batch.num_rows - len(previous)
    if not previous:
        return plan
    if len(previous) != len(keys):
        mask = pa.array(accept)
        table = table.filter(mask)
        keys = [k for k, a in zip(keys, accept, strict=True) if a]
        versions = [v for v, a in zip(versions, accept, strict=True) if a]
        event_ids = [e for e, a in zip(event_ids, accept, strict=True) if a]

    times = table.column(ds.time)
    part_array = partitions_of(times, ds.granularity, ds.timezone)
    state_cols = spec.rollup_state_columns if spec.rollups else ()
    replacing = [i for i, old in enumerate(previous) if old is not None]
    where: tuple[list[str], list[str]] | None = None  # (partitions, tenants) per row
    tombstones: list[dict[str, Any]] = []
    retracted: list[tuple[Any, ...]] = []
    if replacing:
        partitions = _shared_strings(part_array, index)
        tenants = _shared_strings(table.column(ds.tenant), index)
        where = partitions, tenants
        for i in replacing:
            old = previous[i]
            assert old is not None
            if old[4] is not None:
                retracted.append(old[4])
            if old[2] != partitions[i] or old[3] != tenants[i]:
                tombstones.append(_tombstone(spec, keys[i], old, versions[i], event_ids[i]))
    plan.tombstones = len(tombstones)
    plan.rows_written = len(keys)

    def index_updates() -> list[tuple[str, Entry]]:
        partitions, tenants = where or (
            _shared_strings(part_array, index),
            _shared_strings(table.column(ds.tenant), index),
        )
        states: list[tuple[Any, ...]] | list[None]
        if state_cols:
            columns: list[list[Any]] = []
            for c in state_cols:
                if c == ds.time:
                    columns.append(pc.cast(times, pa.int64()).to_pylist())
                elif spec.columns[c].type == "string":
                    columns.append(_shared_strings(table.column(c), index))
                else:
                    columns.append(table.column(c).to_pylist())
            states = list(zip(*columns, strict=True))
        else:
            states = [None] * len(keys)
        entries = zip(versions, event_ids, partitions, tenants, states, strict=True)
        return list(zip(keys, entries, strict=True))

    plan.index_updates = index_updates

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
    tombstones: list[dict[str, Any]],
) -> None:
    """One presorted segment per partition: sort once, slice without copying."""
    schema = base_schema(spec)
    table = _conform(table, schema)
    if tombstones:
        parts = [row.pop(_PART) for row in tombstones]
        table = pa.concat_tables([table, to_table(tombstones, schema)])
        part_array = pa.concat_arrays([part_array, pa.array(parts, pa.string())])
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
    retracted: list[tuple[Any, ...]],
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


def _tombstone(
    spec: DatasourceSpec, key: str, old: Entry, version: int, event_id: str
) -> dict[str, Any]:
    """A row hiding ``key`` where it used to live: its new (version, event_id), its old
    tenant and time, ``_deleted`` set; ``_p`` names the old partition."""
    ds = spec.datasource
    row: dict[str, Any] = {
        ds.key: key,
        ds.version: version,
        ds.event_id: event_id,
        ds.tenant: old[3],
        DELETED: True,
        _PART: old[2],
    }
    if old[4] is not None:
        micros = old[4][spec.rollup_state_columns.index(ds.time)]
        row[ds.time] = _EPOCH + timedelta(microseconds=micros)
    return row

"""Restoring damaged partitions whole: a base partition from rows the log holds, a
rollup partition from the merged base.

Unlike a row repair (``storage.embedded.repair``), nothing of a partition's stored
files is read: they may be missing or altered. Every live segment of the partition is
replaced by one new segment in one catalog transaction, under the write lock, so a
reader sees the old (damaged) partition or the restored one, never a mix; writers'
key indexes reload (the repair count moves), since the restored rows may differ from
what an index built without the damaged file holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa

from storage.embedded.core import StoreCore, partition_bounds, require_identity, unlink_all
from storage.embedded.gcpause import gc_paused
from storage.embedded.rebuild import healthy_base, repair_query
from storage.embedded.segments import (
    DELETED,
    PendingSegment,
    base_schema,
    base_sort_keys,
    rollup_sort_keys,
)
from storage.schema import rollup_schema
from tally.errors import CompactionConflict, InvalidArgument


def restore_partitions(
    core: StoreCore,
    datasource: str,
    tables: Mapping[str, pa.Table],
    read_to: Mapping[tuple[str, int], int] | None = None,
) -> None:
    """Make each base partition of ``tables`` hold exactly its rows (latest per key).
    ``read_to``: where the caller's read of the log ended; if the store has consumed
    beyond it meanwhile, the rows may miss what it took since, and nothing changes."""
    spec = core.registry.get(datasource)
    schema = base_schema(spec)
    pending = []
    for part, rows in sorted(tables.items()):
        table = require_identity(spec, rows)
        table = table.append_column(DELETED, pa.repeat(pa.scalar(False), table.num_rows))
        pending.append(PendingSegment(datasource, part, table.cast(schema), base_sort_keys(spec)))
    written: list[Path] = []
    try:
        with gc_paused(), core.catalog.write():
            ahead = {
                tp: at
                for tp, at in core.catalog.offsets(datasource).items()
                if read_to is not None and at > read_to.get(tp, 0)
            }
            if ahead:
                raise CompactionConflict(
                    f"{datasource}: ingestion moved past the log read for the restore"
                    f" ({len(ahead)} partition(s)); nothing changed, read again"
                )
            _replace(core, datasource, pending, written)
            core.catalog.bump_repairs()
    except BaseException:
        unlink_all(written)
        raise


def restore_rollup(core: StoreCore, rollup_name: str, partition: str) -> None:
    """Recompute the rollup partition from the merged base (its healthy partitions:
    restore damaged base partitions first) and replace it, under the write lock (no
    commit's deltas can fall between the computation and the replacement)."""
    spec, owned = core.registry.owner(rollup_name)
    if owned is None:
        raise InvalidArgument(f"{rollup_name} is not a rollup")
    start, end = partition_bounds(partition, owned.partition, spec)
    schema = rollup_schema(spec, owned)
    written: list[Path] = []
    try:
        with gc_paused(), core.catalog.write():
            clean, dirty = healthy_base(core, spec, {d.path for d in core.catalog.damage()})
            query = repair_query(spec, owned, clean, dirty, [], start, end)
            table = core.duck.sql(query).to_arrow_table().select(schema.names).cast(schema)
            sort = rollup_sort_keys(spec, owned)
            _replace(
                core, rollup_name, [PendingSegment(rollup_name, partition, table, sort)], written
            )
    except BaseException:
        unlink_all(written)
        raise


def _replace(
    core: StoreCore, name: str, pending: list[PendingSegment], written: list[Path]
) -> None:
    """Inside a write transaction: each pending partition's live segments replaced by
    its one new segment (none when it holds no rows)."""
    files = iter(core.write([p for p in pending if p.table.num_rows], written))
    seq = core.catalog.next_seq()
    for plan in pending:
        new = next(files) if plan.table.num_rows else None
        live = core.catalog.partition_segments(name, plan.partition)
        if live:
            core.catalog.replace_segments(name, plan.partition, [s.id for s in live], new, seq)
        elif new is not None:
            core.catalog.add_segments([new], seq=seq)
    core.catalog.forget_damage()
    core.catalog.bump_generation()

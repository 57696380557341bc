"""Row repair for ``tally verify --repair``: make the merged view hold exactly the
given rows, whatever version it holds now."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.calendar import partitions_of
from storage.deltas import latest_in_batch
from storage.embedded.core import StoreCore, require_identity, unlink_all
from storage.embedded.gcpause import gc_paused
from storage.embedded.segments import DELETED, PendingSegment, base_schema, base_sort_keys, to_table
from storage.embedded.sqlgen import compaction_query
from storage.protocol import RepairResult, SegmentInfo


def repair(
    core: StoreCore,
    datasource: str,
    rows: pa.Table | Sequence[Mapping[str, Any]],
    remove_keys: Sequence[str] = (),
    *,
    expect: Mapping[str, tuple[int, str] | None] | None = None,
    partitions: Sequence[str] = (),
) -> RepairResult:
    """Make the merged view hold exactly ``rows`` for their keys and nothing for
    ``remove_keys``, whatever it holds now: an older, an equal or a newer version.

    Why a primitive of its own: the commit path's version guard refuses a row that
    is not newer than the stored one, so neither a corrupted row of the same version
    nor a bogus newer one can be fixed by committing. Every partition involved —
    where the writer's key index has each key, ``partitions`` (where a caller saw
    it), where each row belongs — is rewritten like a compaction: its live segments
    (a pack's through the partition's range) deduplicated, the keys' rows dropped,
    the given rows added. All are replaced in one catalog transaction, under the
    write lock, so readers see the repair whole and no commit interleaves.

    ``expect`` maps keys to the (version, event_id) the caller saw (None: absent);
    a key whose stored state differs now — ingestion moved on — is left alone and
    listed in ``skipped``. Rollups are not touched: rebuild them for
    ``result.partitions``. Writers' key indexes (other processes too) reload.
    """
    spec = core.registry.get(datasource)
    ds = spec.datasource
    schema = base_schema(spec)
    table = rows if isinstance(rows, pa.Table) else to_table(rows, schema)
    table = latest_in_batch(spec, require_identity(spec, table))
    written: list[Path] = []
    try:
        with gc_paused(), core.catalog.write():
            index = core.key_index(spec)
            asked = set(table.column(ds.key).to_pylist()) | set(remove_keys)
            located = index.locate(sorted(asked))
            checked = sorted(k for k in asked if expect is not None and k in expect)
            held = [k for k in checked if k in located]
            now = core.stored_versions(spec, held, sorted({located[k] for k in held}))
            skipped = sorted(k for k in checked if expect is not None and expect[k] != now.get(k))
            if skipped:
                keep = pc.invert(pc.is_in(table.column(ds.key), pa.array(skipped)))
                table = table.filter(keep)
            keys = asked - set(skipped)
            if not keys:
                return RepairResult(datasource, 0, 0, (), tuple(skipped))
            removed = sum(1 for k in set(remove_keys) - set(skipped) if k in located)
            targets = partitions_of(table.column(ds.time), ds.granularity, ds.timezone)
            touched = {located[k] for k in keys if k in located}
            touched |= set(targets.to_pylist()) | set(partitions)
            drop = pa.array(sorted(keys), pa.string())
            table = table.append_column(DELETED, pa.repeat(pa.scalar(False), table.num_rows))
            plans: list[tuple[str, list[SegmentInfo], pa.Table]] = []
            for part in sorted(touched):
                live = core.catalog.partition_segments(datasource, part)
                out = table.filter(pc.equal(targets, part)).cast(schema)
                if live:
                    query = compaction_query(
                        spec, None, core.reads(spec, live), drop_tombstones=True
                    )
                    kept = core.duck.sql(query).to_arrow_table()
                    kept = kept.filter(pc.invert(pc.is_in(kept.column(ds.key), drop)))
                    out = pa.concat_tables([kept.select(schema.names).cast(schema), out])
                if live or out.num_rows:
                    plans.append((part, live, out))
            pending = [
                PendingSegment(datasource, part, out, base_sort_keys(spec))
                for part, _live, out in plans
                if out.num_rows
            ]
            files = iter(core.write(pending, written))
            seq = core.catalog.next_seq()
            for part, live, out in plans:
                new = next(files) if out.num_rows else None
                if live:
                    ids = [s.id for s in live]
                    core.catalog.replace_segments(datasource, part, ids, new, seq)
                elif new is not None:
                    core.catalog.add_segments([new], seq=seq)
            core.catalog.bump_repairs()
            core.catalog.bump_generation()
    except BaseException:
        unlink_all(written)
        raise
    return RepairResult(
        datasource=datasource,
        rows_written=table.num_rows,
        keys_removed=removed,
        partitions=tuple(part for part, _live, _out in plans),
        skipped=tuple(skipped),
    )

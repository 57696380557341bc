"""The embedded engine's compactor: merge a partition's segments, pack cold
partitions into one file, and collect what no live segment needs any more.

Every rewrite is prepared outside the catalog lock and swapped in by one short
catalog transaction that checks the segments it read are still live, so ingestion
never waits on a compaction and a conflict changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from storage.calendar import partitions_of
from storage.embedded.catalog import NewSegment, _Conflict
from storage.embedded.core import StoreCore
from storage.embedded.segments import base_schema, base_sort_keys, rollup_sort_keys
from storage.embedded.sqlgen import compaction_query, pack_query
from storage.protocol import CompactionResult
from storage.schema import rollup_schema
from tally.errors import CompactionConflict, InvalidArgument, PartitionDamaged


class EmbeddedCompactor:
    """:class:`storage.protocol.Compactor` over the embedded store's files."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def compact(
        self, datasource: str, partition: str, segment_ids: Sequence[int] | None = None
    ) -> CompactionResult | None:
        """Replace segments of one partition with one deduplicated segment, atomically.

        ``segment_ids`` defaults to every live segment of the partition. Segments
        committed while this runs are not touched and stay live. Returns None when
        there is nothing to do (no live segment, or a rollup partition already in one).
        """
        spec, rollup_name = self.core.owner(datasource)
        with self.core.catalog.read():
            live = self.core.catalog.partition_segments(datasource, partition)
            damaged = {d.path for d in self.core.catalog.damage()}
        if any(s.path in damaged for s in live):
            raise PartitionDamaged(
                f"{datasource}/{partition} is damaged: it is rebuilt from the log"
                " (tally verify --repair), not compacted"
            )
        chosen = live if segment_ids is None else [s for s in live if s.id in set(segment_ids)]
        if segment_ids is not None and len(chosen) != len(set(segment_ids)):
            missing = sorted(set(segment_ids) - {s.id for s in chosen})
            raise CompactionConflict(
                f"{datasource}/{partition}: segments {missing} are not live (replaced meanwhile?)"
            )
        if not chosen or (len(chosen) == 1 and segment_ids is None and rollup_name is not None):
            return None
        # Tombstones can be dropped only if no older segment outside the set could
        # still hold the row they hide: the set must be a prefix in commit order.
        max_seq = max(s.seq for s in chosen)
        chosen_ids = {s.id for s in chosen}
        is_prefix = all(s.id in chosen_ids for s in live if s.seq <= max_seq)
        rollup = spec.rollup(rollup_name) if rollup_name else None
        query = compaction_query(
            spec, rollup, self.core.reads(spec, chosen), drop_tombstones=is_prefix
        )
        table = self.core.duck.sql(query).to_arrow_table()
        if rollup is None:
            schema, sort = base_schema(spec), base_sort_keys(spec)
        else:
            schema, sort = rollup_schema(spec, rollup), rollup_sort_keys(spec, rollup)
        table = table.select(schema.names).cast(schema)
        new_path: Path | None = None
        new: NewSegment | None = None
        if table.num_rows:
            new_path, size, digest = self.core.segments.write(table, datasource, partition, sort)
            new = NewSegment(datasource, partition, str(new_path), table.num_rows, size, digest)
        try:
            with self.core.catalog.write():
                new_id = self.core.catalog.replace_segments(
                    datasource, partition, [s.id for s in chosen], new, max_seq
                )
        except _Conflict:
            if new_path is not None:
                new_path.unlink(missing_ok=True)
            raise CompactionConflict(
                f"{datasource}/{partition}: segments were replaced meanwhile; nothing changed"
            ) from None
        except BaseException:
            if new_path is not None:
                new_path.unlink(missing_ok=True)
            raise
        return CompactionResult(
            datasource=datasource,
            partition=partition,
            replaced_segments=len(chosen),
            rows_in=sum(s.rows for s in chosen),
            rows_out=table.num_rows,
            bytes_in=sum(s.bytes for s in chosen),
            bytes_out=new.bytes if new else 0,
            segment_id=new_id,
        )

    def pack(self, datasource: str, segment_ids: Sequence[int]) -> CompactionResult | None:
        """Write the partitions of ``segment_ids`` — each must be a partition's only
        live segment — into one file, atomically, one packed segment row each.

        Why: a query pays a fixed cost per file it opens, and a year of daily
        partitions is 365 files; cold partitions packed by month make it twelve (Druid
        compacts old intervals into coarser segments for the same reason). Packs sort
        by tenant then time like any segment, so one merchant's rows stay together.
        Partitions keep their identity: a late write to one adds a segment to that
        partition, whose compaction reads its own range of the pack.
        """
        spec, rollup_name = self.core.owner(datasource)
        if rollup_name is not None:
            raise InvalidArgument(f"{datasource} is a rollup: only base datasources are packed")
        wanted = set(segment_ids)
        with self.core.catalog.read():
            live = self.core.catalog.live_segments(datasource)
            damaged = {d.path for d in self.core.catalog.damage()}
        chosen = [s for s in live if s.id in wanted]
        if any(s.path in damaged for s in chosen):
            raise PartitionDamaged(f"{datasource}: a partition to pack is damaged; nothing changed")
        per_partition: dict[str, int] = {}
        for seg in live:
            per_partition[seg.partition] = per_partition.get(seg.partition, 0) + 1
        if len(chosen) != len(wanted) or any(per_partition[s.partition] != 1 for s in chosen):
            raise CompactionConflict(
                f"{datasource}: the segments to pack changed meanwhile; nothing changed"
            )
        if len(chosen) < 2:
            return None
        table = self.core.duck.sql(pack_query(spec, self.core.reads(spec, chosen))).to_arrow_table()
        schema = base_schema(spec)
        table = table.select(schema.names).cast(schema)
        keys = partitions_of(
            table.column(spec.datasource.time),
            spec.datasource.granularity,
            spec.datasource.timezone,
        )
        rows = {p: 0 for p in sorted({s.partition for s in chosen})}
        for part in keys.to_pylist():
            rows[part] += 1
        first, last = min(rows), max(rows)
        path, size, digest = self.core.segments.write(
            table, datasource, f"_packs/{first}_{last}", base_sort_keys(spec)
        )
        try:
            with self.core.catalog.write():
                self.core.catalog.add_pack(
                    datasource, [s.id for s in chosen], str(path), rows, size, digest
                )
        except _Conflict:
            path.unlink(missing_ok=True)
            raise CompactionConflict(
                f"{datasource}: the segments to pack were replaced meanwhile; nothing changed"
            ) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return CompactionResult(
            datasource=datasource,
            partition=f"{first}..{last}",
            replaced_segments=len(chosen),
            rows_in=sum(s.rows for s in chosen),
            rows_out=table.num_rows,
            bytes_in=sum(s.bytes for s in chosen),
            bytes_out=size,
            segment_id=None,
        )

    @staticmethod
    def _remove_files(paths: Sequence[str]) -> int:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        return len(paths)

    def collect_garbage(self, *, orphan_grace_s: float | None = None) -> int:
        """Delete replaced segments past the grace period and crash-orphaned files."""
        now = time.time()
        removed = 0
        with self.core.catalog.read():
            expired = self.core.catalog.expired_segments(now - self.core.settings.store.gc_grace_s)
        if expired:
            # A pack's file is shared by several segment rows: it goes with the last.
            with self.core.catalog.write():
                self.core.catalog.forget_segments([i for i, _ in expired])
                unused = self.core.catalog.unreferenced(name for _, name in expired)
            # A crash from here on leaves files no row refers to: orphans, removed below
            # by the next collection.
            removed += self._remove_files(unused)
        grace = (
            self.core.settings.store.orphan_grace_s if orphan_grace_s is None else orphan_grace_s
        )
        root = self.core.segments.root
        if root.exists():
            with self.core.catalog.read():
                known = self.core.catalog.all_paths()
            for path in root.rglob("*.parquet"):
                if str(path) in known:
                    continue
                try:
                    if path.stat().st_mtime < now - grace:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

"""The embedded store's writer side: exactly-once commits, compaction, garbage collection.

Commit protocol (crash-safe at every point):

1. ``BEGIN IMMEDIATE`` on the catalog — one writer at a time across processes.
2. Fence: the batch's start offsets must equal the stored ones, else reject.
3. Version guard: the writer's key index (see :mod:`storage.embedded.keyindex`),
   first caught up with segments other writers committed, drops rows not newer
   than the stored (version, event_id).
4. Write one Parquet segment per touched partition (base rows, tombstones for keys
   that moved partition or tenant) and per touched rollup partition (signed deltas:
   retract the stored state, add the new one); fsync.
5. Insert the segments, offsets and partition stats, bump the generation,
   ``COMMIT``. Only now is anything visible; only now is the key index updated.

A crash before step 5 leaves unreferenced files (orphans, removed by
:meth:`EmbeddedStore.collect_garbage` once older than ``orphan_grace_s``) and no
catalog change; a crash after it leaves a complete commit.

Equal versions: the row with the greater ``event_id`` (string order) wins, so the
outcome never depends on arrival order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from rollups.rebuild import RebuildReport, repair_query
from storage.embedded.calendar import partitions_of
from storage.embedded.catalog import Catalog, DeadLetterRecord, NewSegment, _Conflict
from storage.embedded.commit import latest_in_batch, plan_commit
from storage.embedded.gcpause import gc_paused
from storage.embedded.keyindex import KeyIndex
from storage.embedded.segments import (
    DELETED,
    PendingSegment,
    SegmentWriter,
    base_schema,
    base_sort_keys,
    rollup_schema,
    rollup_sort_keys,
    to_table,
)
from storage.embedded.sqlgen import Read, compaction_query, pack_query
from storage.protocol import (
    Capabilities,
    CommitResult,
    CompactionResult,
    OffsetRange,
    PartitionStats,
    RepairResult,
    SegmentInfo,
    TopicPartition,
)
from tally.errors import CompactionConflict, InvalidArgument, InvalidRow, OffsetMismatch
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import Granularity, bucket_range, parse_duration

CAPABILITIES = Capabilities(
    name="embedded",
    sql_dialect="duckdb",
    merge_on_read=True,
    transactional_offsets=True,
    manual_compaction=True,
    resident_rollups=True,
)


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _partition_bounds(
    partition: str, granularity: Granularity, spec: DatasourceSpec
) -> tuple[datetime, datetime]:
    try:
        return bucket_range(partition, granularity, spec.tz)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in rows
    ]


class EmbeddedStore:
    """Writer side of the embedded store. One instance per process (not thread-safe)."""

    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.catalog = Catalog(settings.catalog_path, busy_timeout_s=settings.store.busy_timeout_s)
        self.segments = SegmentWriter(settings.segments_dir)
        self._indexes: dict[str, KeyIndex] = {}
        self._duck: duckdb.DuckDBPyConnection | None = None

    def close(self) -> None:
        self.catalog.close()
        if self._duck is not None:
            self._duck.close()

    @property
    def duck(self) -> duckdb.DuckDBPyConnection:
        if self._duck is None:
            self._duck = duckdb.connect(
                config={
                    "threads": self.settings.store.duckdb_threads,
                    "memory_limit": self.settings.store.duckdb_memory_limit,
                }
            )
            self._duck.execute("SET TimeZone = 'UTC'")
        return self._duck

    # --- key index ---------------------------------------------------------------------

    def key_index(self, spec: DatasourceSpec) -> KeyIndex:
        """The caught-up key index; call inside a catalog write transaction."""
        index = self._indexes.get(spec.name)
        repairs = self.catalog.repairs()
        if index is None or index.repairs != repairs:
            # Catching up only ever raises versions; after a repair (which may lower or
            # remove some) the index is rebuilt from the segments.
            index = self._indexes[spec.name] = KeyIndex(spec)
            seq = self.catalog.current_seq()
            index.load(self.duck, self._reads(spec, self.catalog.live_segments(spec.name)), seq)
            index.repairs = repairs
            return index
        newer = self.catalog.segments_after(spec.name, index.seq)
        if newer:
            index.apply_segments(self.duck, self._reads(spec, newer))
            index.seq = max(s.seq for s in newer)
        return index

    # --- offsets -------------------------------------------------------------------

    def stored_offsets(self, datasource: str) -> dict[TopicPartition, int]:
        with self.catalog.read():
            return self.catalog.offsets(datasource)

    # --- commit ----------------------------------------------------------------------

    def commit(
        self,
        datasource: str,
        rows: pa.Table | Sequence[Mapping[str, Any]],
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        *,
        now: datetime | None = None,
        dead_letters: Sequence[DeadLetterRecord] = (),
    ) -> CommitResult:
        """Commit a batch. ``dead_letters`` are the batch's unusable messages: they are
        recorded in the same transaction (an outbox a publisher empties into the
        dead-letter topic), so moving the offsets past them and keeping them are one
        atomic step."""
        spec = self.registry.get(datasource)
        batch = rows if isinstance(rows, pa.Table) else to_table(rows, base_schema(spec))
        batch = _require_identity(spec, batch)
        now_s = (now or datetime.now(UTC)).timestamp()
        late_before_us = int(
            (now_s - parse_duration(spec.datasource.active_window).total_seconds()) * 1e6
        )
        ranges = {tp: (r.start, r.end) for tp, r in (offsets or {}).items()}

        written: list[Path] = []
        try:
            with gc_paused(), self.catalog.write():
                problems = self.catalog.check_and_set_offsets(datasource, ranges)
                if problems:
                    raise OffsetMismatch(
                        f"commit to {datasource!r} rejected, another writer moved on: "
                        + "; ".join(problems)
                    )
                index = self.key_index(spec)
                plan = plan_commit(spec, batch, index, late_before_us)
                writes = self.segments.begin_many(plan.segments, written)
                try:
                    updates = plan.index_updates()  # Python work while the disk is busy
                finally:
                    files = writes.wait()  # before any cleanup may unlink them
                new_segments = self._new_segments(plan.segments, files)
                seq = index.seq
                if new_segments:
                    seq = self.catalog.next_seq()
                    self.catalog.add_segments(new_segments, seq=seq)
                    self.catalog.bump_generation()
                self.catalog.record_writes(datasource, plan.partition_stats)
                if dead_letters:
                    self.catalog.add_dead_letters(dead_letters)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        with gc_paused():
            index.put_many(updates)
        index.seq = seq
        return CommitResult(
            datasource=datasource,
            rows_in=batch.num_rows,
            rows_written=plan.rows_written,
            stale_rows=plan.stale,
            tombstones=plan.tombstones,
            segments=len(new_segments),
            rollup_rows=plan.rollup_rows,
            late_rows=sum(late for late, _ in plan.partition_stats.values()),
            partitions=plan.partitions,
        )

    def _write(self, pending: list[PendingSegment], written: list[Path]) -> list[NewSegment]:
        return self._new_segments(pending, self.segments.write_many(pending, written))

    @staticmethod
    def _new_segments(
        pending: list[PendingSegment], files: list[tuple[Path, int]]
    ) -> list[NewSegment]:
        return [
            NewSegment(p.datasource, p.partition, str(path), p.table.num_rows, size)
            for p, (path, size) in zip(pending, files, strict=True)
        ]

    # --- compaction --------------------------------------------------------------------

    def _owner(self, datasource: str) -> tuple[DatasourceSpec, str | None]:
        """(base spec, rollup name or None) for a base or rollup datasource name."""
        for spec in self.registry:
            if spec.name == datasource:
                return spec, None
            for rollup in spec.rollups:
                if rollup.name == datasource:
                    return spec, rollup.name
        self.registry.get(datasource)  # raises UnknownDatasource with the known names
        raise AssertionError("unreachable")

    def compact(
        self, datasource: str, partition: str, segment_ids: Sequence[int] | None = None
    ) -> CompactionResult | None:
        """Replace segments of one partition with one deduplicated segment, atomically.

        ``segment_ids`` defaults to every live segment of the partition. Segments
        committed while this runs are not touched and stay live. Returns None when
        there is nothing to do (no live segment, or a rollup partition already in one).
        """
        spec, rollup_name = self._owner(datasource)
        with self.catalog.read():
            live = self.catalog.partition_segments(datasource, partition)
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
        query = compaction_query(spec, rollup, self._reads(spec, chosen), drop_tombstones=is_prefix)
        table = self.duck.sql(query).to_arrow_table()
        if rollup is None:
            schema, sort = base_schema(spec), base_sort_keys(spec)
        else:
            schema, sort = rollup_schema(spec, rollup), rollup_sort_keys(spec, rollup)
        table = table.select(schema.names).cast(schema)
        new_path: Path | None = None
        new: NewSegment | None = None
        if table.num_rows:
            new_path, size = self.segments.write(table, datasource, partition, sort)
            new = NewSegment(datasource, partition, str(new_path), table.num_rows, size)
        try:
            with self.catalog.write():
                new_id = self.catalog.replace_segments(
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

    def _reads(self, spec: DatasourceSpec, segments: Sequence[SegmentInfo]) -> list[Read]:
        """How to read ``segments``: whole, or a pack's rows of the segment's partition."""
        granularity = spec.datasource.granularity
        return [
            Read(s.path, *_partition_bounds(s.partition, granularity, spec))
            if s.packed
            else Read(s.path)
            for s in segments
        ]

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
        spec, rollup_name = self._owner(datasource)
        if rollup_name is not None:
            raise InvalidArgument(f"{datasource} is a rollup: only base datasources are packed")
        wanted = set(segment_ids)
        with self.catalog.read():
            live = self.catalog.live_segments(datasource)
        chosen = [s for s in live if s.id in wanted]
        per_partition: dict[str, int] = {}
        for seg in live:
            per_partition[seg.partition] = per_partition.get(seg.partition, 0) + 1
        if len(chosen) != len(wanted) or any(per_partition[s.partition] != 1 for s in chosen):
            raise CompactionConflict(
                f"{datasource}: the segments to pack changed meanwhile; nothing changed"
            )
        if len(chosen) < 2:
            return None
        table = self.duck.sql(pack_query(spec, self._reads(spec, chosen))).to_arrow_table()
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
        path, size = self.segments.write(
            table, datasource, f"_packs/{first}_{last}", base_sort_keys(spec)
        )
        try:
            with self.catalog.write():
                self.catalog.add_pack(datasource, [s.id for s in chosen], str(path), rows, size)
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
        with self.catalog.read():
            expired = self.catalog.expired_segments(now - self.settings.store.gc_grace_s)
        if expired:
            # A pack's file is shared by several segment rows: it goes with the last.
            with self.catalog.write():
                self.catalog.forget_segments([i for i, _ in expired])
                unused = self.catalog.unreferenced(name for _, name in expired)
            # A crash from here on leaves files no row refers to: orphans, removed below
            # by the next collection.
            removed += self._remove_files(unused)
        grace = self.settings.store.orphan_grace_s if orphan_grace_s is None else orphan_grace_s
        root = self.segments.root
        if root.exists():
            with self.catalog.read():
                known = self.catalog.all_paths()
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

    # --- dead-letter outbox ----------------------------------------------------------------

    def pending_dead_letters(self, datasource: str) -> list[DeadLetterRecord]:
        with self.catalog.read():
            return self.catalog.pending_dead_letters(datasource)

    def mark_dead_letters_published(self, published: Sequence[tuple[str, int, int]]) -> None:
        """(id, dead-letter topic partition, offset) of letters the broker acknowledged."""
        with self.catalog.write():
            self.catalog.mark_published(published)

    # --- rollup repair ------------------------------------------------------------------

    def rebuild_rollups(
        self, datasource: str, partition: str | None = None, rollup_name: str | None = None
    ) -> list[RebuildReport]:
        """Recompute rollups from the merged base; write ``expected − stored`` deltas.

        Holds the catalog write lock throughout, so the comparison sees one state and
        no commit can interleave; ingestion waits (and retries) meanwhile.
        """
        spec = self.registry.get(datasource)
        rollups = [spec.rollup(rollup_name)] if rollup_name else list(spec.rollups)
        start = end = None
        if partition is not None:
            start, end = _partition_bounds(partition, spec.datasource.granularity, spec)
        reports: list[RebuildReport] = []
        written: list[Path] = []
        try:
            with gc_paused(), self.catalog.write():
                parts: dict[str, list[SegmentInfo]] = {}
                for seg in self.catalog.live_segments(spec.name):
                    parts.setdefault(seg.partition, []).append(seg)
                clean = [r for p in parts.values() if len(p) == 1 for r in self._reads(spec, p)]
                dirty = [r for p in parts.values() if len(p) > 1 for r in self._reads(spec, p)]
                new_segments: list[NewSegment] = []
                for rollup in rollups:
                    paths = [s.path for s in self.catalog.live_segments(rollup.name)]
                    query = repair_query(spec, rollup, clean, dirty, paths, start, end)
                    table = self.duck.sql(query).to_arrow_table()
                    report = RebuildReport(rollup.name, partition, table.num_rows)
                    report.differences = _jsonable(table.slice(0, 20).to_pylist())
                    reports.append(report)
                    if not table.num_rows:
                        continue
                    schema = rollup_schema(spec, rollup)
                    table = table.select(schema.names).cast(schema)
                    keys = partitions_of(
                        table.column("bucket"), rollup.partition, spec.datasource.timezone
                    )
                    sort = rollup_sort_keys(spec, rollup)
                    pending = [
                        PendingSegment(rollup.name, part, table.filter(pc.equal(keys, part)), sort)
                        for part in sorted(set(keys.to_pylist()))
                    ]
                    new_segments.extend(self._write(pending, written))
                if new_segments:
                    self.catalog.add_segments(new_segments)
                    self.catalog.bump_generation()
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return reports

    # --- row repair -------------------------------------------------------------------

    def repair(
        self,
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
        spec = self.registry.get(datasource)
        ds = spec.datasource
        schema = base_schema(spec)
        table = rows if isinstance(rows, pa.Table) else to_table(rows, schema)
        table = latest_in_batch(spec, _require_identity(spec, table))
        written: list[Path] = []
        try:
            with gc_paused(), self.catalog.write():
                index = self.key_index(spec)
                asked = set(table.column(ds.key).to_pylist()) | set(remove_keys)
                skipped = sorted(
                    k
                    for k in asked
                    if expect is not None and k in expect and expect[k] != _state(index, k)
                )
                if skipped:
                    keep = pc.invert(pc.is_in(table.column(ds.key), pa.array(skipped)))
                    table = table.filter(keep)
                keys = asked - set(skipped)
                if not keys:
                    return RepairResult(datasource, 0, 0, (), tuple(skipped))
                removed = sum(1 for k in set(remove_keys) - set(skipped) if k in index.entries)
                targets = partitions_of(table.column(ds.time), ds.granularity, ds.timezone)
                touched = {index.entries[k][2] for k in keys if k in index.entries}
                touched |= set(targets.to_pylist()) | set(partitions)
                drop = pa.array(sorted(keys), pa.string())
                table = table.append_column(DELETED, pa.repeat(pa.scalar(False), table.num_rows))
                plans: list[tuple[str, list[SegmentInfo], pa.Table]] = []
                for part in sorted(touched):
                    live = self.catalog.partition_segments(datasource, part)
                    out = table.filter(pc.equal(targets, part)).cast(schema)
                    if live:
                        query = compaction_query(
                            spec, None, self._reads(spec, live), drop_tombstones=True
                        )
                        kept = self.duck.sql(query).to_arrow_table()
                        kept = kept.filter(pc.invert(pc.is_in(kept.column(ds.key), drop)))
                        out = pa.concat_tables([kept.select(schema.names).cast(schema), out])
                    if live or out.num_rows:
                        plans.append((part, live, out))
                pending = [
                    PendingSegment(datasource, part, out, base_sort_keys(spec))
                    for part, _live, out in plans
                    if out.num_rows
                ]
                files = iter(self._write(pending, written))
                seq = self.catalog.next_seq()
                for part, live, out in plans:
                    new = next(files) if out.num_rows else None
                    if live:
                        ids = [s.id for s in live]
                        self.catalog.replace_segments(datasource, part, ids, new, seq)
                    elif new is not None:
                        self.catalog.add_segments([new], seq=seq)
                self.catalog.bump_repairs()
                self.catalog.bump_generation()
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return RepairResult(
            datasource=datasource,
            rows_written=table.num_rows,
            keys_removed=removed,
            partitions=tuple(part for part, _live, _out in plans),
            skipped=tuple(skipped),
        )

    # --- statistics -----------------------------------------------------------------

    def datasource_names(self, datasource: str | None = None) -> list[str]:
        specs = list(self.registry) if datasource is None else [self._owner(datasource)[0]]
        names: list[str] = []
        for spec in specs:
            names.append(spec.name)
            names.extend(r.name for r in spec.rollups)
        if datasource is not None and datasource != specs[0].name:
            return [datasource]
        return names

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]:
        names = None if datasource is None else self.datasource_names(datasource)
        with self.catalog.read():
            rows = self.catalog.stats_rows(names)
        return [
            PartitionStats(
                datasource=str(ds),
                partition=str(part),
                segments=int(segs),  # type: ignore[call-overload]
                rows=int(nrows),  # type: ignore[call-overload]
                bytes=int(nbytes),  # type: ignore[call-overload]
                late_rows=int(late),  # type: ignore[call-overload]
                last_write_at=_ts(lw),  # type: ignore[arg-type]
                last_compacted_at=_ts(lc),  # type: ignore[arg-type]
            )
            for ds, part, segs, nrows, nbytes, late, lw, lc in rows
        ]

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]:
        with self.catalog.read():
            return self.catalog.live_segments(datasource)

    def partition_range(self, datasource: str, partition: str) -> tuple[datetime, datetime]:
        spec, rollup_name = self._owner(datasource)
        granularity = (
            spec.rollup(rollup_name).partition if rollup_name else spec.datasource.granularity
        )
        return _partition_bounds(partition, granularity, spec)


def _state(index: KeyIndex, key: str) -> tuple[int, str] | None:
    entry = index.entries.get(key)
    return None if entry is None else (entry[0], entry[1])


def _require_identity(spec: DatasourceSpec, batch: pa.Table) -> pa.Table:
    """The batch in the base schema; identity columns must be present and non-null."""
    ds = spec.datasource
    schema = base_schema(spec)
    missing = [
        c
        for c in (ds.key, ds.version, ds.event_id, ds.time, ds.tenant)
        if c not in batch.column_names
    ]
    if missing:
        raise InvalidRow(f"batch lacks required column(s) {', '.join(missing)}")
    for c in (ds.key, ds.version, ds.event_id, ds.time, ds.tenant):
        if batch.column(c).null_count:
            raise InvalidRow(f"column {c!r} has null values")
    time_type = batch.schema.field(ds.time).type
    if not pa.types.is_timestamp(time_type) or time_type.tz is None:
        raise InvalidRow(f"column {ds.time!r} must be a timezone-aware timestamp")
    names = [n for n in schema.names if n != DELETED]
    try:
        present = batch.select([n for n in names if n in batch.column_names])
        for n in names:
            if n not in present.column_names:
                present = present.append_column(n, pa.nulls(present.num_rows, schema.field(n).type))
        return present.select(names).cast(pa.schema([schema.field(n) for n in names]))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidRow(f"batch does not match the {spec.name} schema: {exc}") from exc

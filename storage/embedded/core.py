"""What every part of the embedded writer shares: the catalog, the segment writer,
a DuckDB connection for rewrites, and each datasource's caught-up key index.

The writer's concerns (commit, compaction and packing, rollup rebuild, row repair,
the dead-letter outbox) live in modules of their own and all work on one
:class:`StoreCore`, so a process opens the catalog and builds its key indexes once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
from sqlglot import exp

from storage.embedded import keysnapshot as snapshot
from storage.embedded.catalog import Catalog, NewSegment
from storage.embedded.integrity import check_files
from storage.embedded.keyindex import KeyIndex
from storage.embedded.segments import (
    DELETED,
    PendingSegment,
    SegmentWriter,
    Written,
    base_schema,
)
from storage.embedded.sqlgen import DIALECT, Read, merged_base
from storage.protocol import SegmentInfo
from storage.sql import col, subquery
from tally.errors import InvalidArgument, InvalidRow
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import Granularity, bucket_range

log = logging.getLogger(__name__)


class StoreCore:
    """State of one embedded writer (one per process; not thread-safe)."""

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.catalog = Catalog(settings.catalog_path, busy_timeout_s=settings.store.busy_timeout_s)
        self.segments = SegmentWriter(settings.segments_dir)
        self._indexes: dict[str, KeyIndex] = {}
        self._snapshots = settings.data_dir / "keyindex"
        self._duck: duckdb.DuckDBPyConnection | None = None
        self._closed = False
        # A file lost while no writer ran is found before any writer reads it.
        check_files(self.catalog, full=False, found_by="open")

    def close(self) -> None:
        """Snapshot the key indexes and close the connections; a second call is a no-op."""
        if self._closed:
            return
        self._closed = True
        try:
            self.save_indexes()
        except OSError as exc:  # the next start rebuilds instead: slower, never wrong
            log.warning("key index snapshot not written: %s", exc)
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

    def key_index(self, spec: DatasourceSpec) -> KeyIndex:
        """The caught-up key index; call inside a catalog write transaction."""
        index = self._indexes.get(spec.name)
        repairs = self.catalog.repairs()
        if index is None or index.repairs != repairs:
            # Catching up only ever raises versions; after a repair (which may lower or
            # remove some) the index is rebuilt from the segments.
            index = self._indexes[spec.name] = self._fresh_index(spec, repairs)
        newer = self.catalog.segments_after(spec.name, index.seq)
        if newer:
            index.apply_segments(self.duck, self.reads(spec, newer))
            index.seq = max(s.seq for s in newer)
        return index

    def _fresh_index(self, spec: DatasourceSpec, repairs: int) -> KeyIndex:
        """The snapshot if it still describes this catalog, else a rebuild from the live
        segments (then snapshotted). Either is caught up by the caller."""
        identity = self.catalog.identity()
        damaged = {d.path for d in self.catalog.damage()}
        seq = self.catalog.current_seq()
        if not damaged:
            loaded = snapshot.load(self._snapshots, spec, identity, repairs, seq)
            if loaded is not None:
                return loaded
        index = KeyIndex(spec)
        # Without the damaged files: what they held is unknown until restored from the
        # log, which reloads every index (its rows may differ from these).
        live = [s for s in self.catalog.live_segments(spec.name) if s.path not in damaged]
        index.load(self.duck, self.reads(spec, live), seq)
        index.repairs = repairs
        if not damaged:
            snapshot.save(self._snapshots, index, identity)
        return index

    def save_indexes(self) -> None:
        """Snapshot every key index (a clean stop: the next start loads, not rebuilds)."""
        if not self._indexes:
            return
        identity = self.catalog.identity()
        for index in self._indexes.values():
            snapshot.save(self._snapshots, index, identity)

    def stored_versions(
        self, spec: DatasourceSpec, keys: Sequence[str], partitions: Sequence[str]
    ) -> dict[str, tuple[int, str]]:
        """The exact (version, event_id) of each key's live row in ``partitions`` (the
        key index keeps only a prefix and a hash of the id). Call inside a catalog
        transaction."""
        if not keys:
            return {}
        ds = spec.datasource
        live = [s for p in partitions for s in self.catalog.partition_segments(spec.name, p)]
        relation = merged_base(spec, [], self.reads(spec, live))
        wanted = exp.In(
            this=col(ds.key), expressions=[exp.Literal.string(k) for k in dict.fromkeys(keys)]
        )
        query = exp.select(col(ds.key), col(ds.version), col(ds.event_id))
        query = query.from_(subquery(relation, "m")).where(wanted)
        rows = self.duck.sql(query.sql(dialect=DIALECT)).fetchall()
        return {str(k): (int(v), str(e)) for k, v, e in rows}

    def owner(self, datasource: str) -> tuple[DatasourceSpec, str | None]:
        """(base spec, rollup name or None) for a base or rollup datasource name."""
        spec, rollup = self.registry.owner(datasource)
        return spec, None if rollup is None else rollup.name

    def reads(self, spec: DatasourceSpec, segments: Sequence[SegmentInfo]) -> list[Read]:
        """How to read ``segments``: whole, or a pack's rows of the segment's partition."""
        granularity = spec.datasource.granularity
        return [
            Read(s.path, *partition_bounds(s.partition, granularity, spec))
            if s.packed
            else Read(s.path)
            for s in segments
        ]

    def write(self, pending: list[PendingSegment], written: list[Path]) -> list[NewSegment]:
        """Write segments durably (``written`` collects their paths for cleanup)."""
        return new_segments(pending, self.segments.write_many(pending, written))


def new_segments(pending: list[PendingSegment], files: list[Written]) -> list[NewSegment]:
    return [
        NewSegment(p.datasource, p.partition, str(f.path), p.table.num_rows, f.size, f.digest)
        for p, f in zip(pending, files, strict=True)
    ]


def partition_bounds(
    partition: str, granularity: Granularity, spec: DatasourceSpec
) -> tuple[datetime, datetime]:
    try:
        return bucket_range(partition, granularity, spec.tz)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


def unlink_all(paths: Sequence[Path]) -> None:
    """Remove files a failed write left behind (never referenced by the catalog)."""
    for path in paths:
        path.unlink(missing_ok=True)


def require_identity(spec: DatasourceSpec, batch: pa.Table) -> pa.Table:
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

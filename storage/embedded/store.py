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

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.embedded import rebuild, restore
from storage.embedded import repair as row_repair
from storage.embedded.capabilities import CAPABILITIES
from storage.embedded.commit import plan_commit
from storage.embedded.compactor import EmbeddedCompactor
from storage.embedded.core import (
    StoreCore,
    partition_bounds,
    require_identity,
    unlink_all,
)
from storage.embedded.gcpause import gc_paused
from storage.embedded.integrity import check_files
from storage.embedded.outbox import EmbeddedOutbox
from storage.embedded.segments import base_schema, to_table
from storage.protocol import (
    CommitResult,
    Damage,
    DeadLetterRecord,
    OffsetRange,
    PartitionStats,
    RebuildReport,
    RepairResult,
    SegmentInfo,
    StoredPosition,
    TopicPartition,
)
from tally.errors import OffsetMismatch
from tally.settings import Settings
from tally.specs import SpecRegistry
from tally.timeutil import parse_duration


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class EmbeddedStore:
    """Writer side of the embedded store. One instance per process (not thread-safe)."""

    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.core = StoreCore(settings, registry)
        self.settings = settings
        self.registry = registry
        self.compactor = EmbeddedCompactor(self.core)
        self.outbox = EmbeddedOutbox(self.core)

    def close(self) -> None:
        self.core.close()

    def stored_offsets(self, datasource: str) -> dict[TopicPartition, int]:
        with self.core.catalog.read():
            return self.core.catalog.offsets(datasource)

    def stored_positions(self, datasource: str) -> dict[TopicPartition, StoredPosition]:
        with self.core.catalog.read():
            rows = self.core.catalog.positions(datasource)
        return {tp: StoredPosition(o, log, reset) for tp, (o, log, reset) in rows.items()}

    def reset_positions(
        self, datasource: str, positions: Mapping[TopicPartition, StoredPosition]
    ) -> None:
        rows = {tp: (p.offset, p.log, p.reset or "reset") for tp, p in positions.items()}
        with self.core.catalog.write():
            self.core.catalog.reset_positions(datasource, rows)

    def pending_batches(self, datasource: str) -> list[dict[TopicPartition, OffsetRange]]:
        return []  # a commit is one transaction: never left half-done

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
        spec = self.core.registry.get(datasource)
        batch = rows if isinstance(rows, pa.Table) else to_table(rows, base_schema(spec))
        batch = require_identity(spec, batch)
        now_s = (now or datetime.now(UTC)).timestamp()
        late_before_us = int(
            (now_s - parse_duration(spec.datasource.active_window).total_seconds()) * 1e6
        )
        ranges = {tp: (r.start, r.end, r.log) for tp, r in (offsets or {}).items()}

        written: list[Path] = []
        try:
            with gc_paused(), self.core.catalog.write():
                problems = self.core.catalog.check_and_set_offsets(datasource, ranges)
                if problems:
                    raise OffsetMismatch(
                        f"commit to {datasource!r} rejected, another writer moved on: "
                        + "; ".join(problems)
                    )
                index = self.core.key_index(spec)
                plan = plan_commit(spec, batch, index, late_before_us, self.core.stored_versions)
                added = self.core.write(plan.segments, written)
                seq = index.seq
                if added:
                    seq = self.core.catalog.next_seq()
                    self.core.catalog.add_segments(added, seq=seq)
                    self.core.catalog.bump_generation()
                self.core.catalog.record_writes(datasource, plan.partition_stats)
                if dead_letters:
                    self.core.catalog.add_dead_letters(dead_letters)
        except BaseException:
            unlink_all(written)
            raise
        plan.index_update()
        index.seq = seq
        return CommitResult(
            datasource=datasource,
            rows_in=batch.num_rows,
            rows_written=plan.rows_written,
            stale_rows=plan.stale,
            tombstones=plan.tombstones,
            segments=len(added),
            rollup_rows=plan.rollup_rows,
            late_rows=sum(late for late, _ in plan.partition_stats.values()),
            partitions=plan.partitions,
        )

    def rebuild_rollups(
        self, datasource: str, partition: str | None = None, rollup_name: str | None = None
    ) -> list[RebuildReport]:
        return rebuild.rebuild_rollups(self.core, datasource, partition, rollup_name)

    def check_files(self, *, full: bool, found_by: str) -> list[Damage]:
        return check_files(self.core.catalog, full=full, found_by=found_by)

    def restore_partitions(
        self,
        datasource: str,
        tables: Mapping[str, pa.Table],
        read_to: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        restore.restore_partitions(self.core, datasource, tables, read_to)

    def restore_rollup(self, rollup: str, partition: str) -> None:
        restore.restore_rollup(self.core, rollup, partition)

    def repair(
        self,
        datasource: str,
        rows: pa.Table | Sequence[Mapping[str, Any]],
        remove_keys: Sequence[str] = (),
        *,
        expect: Mapping[str, tuple[int, str] | None] | None = None,
        partitions: Sequence[str] = (),
    ) -> RepairResult:
        return row_repair.repair(
            self.core, datasource, rows, remove_keys, expect=expect, partitions=partitions
        )

    def datasource_names(self, datasource: str | None = None) -> list[str]:
        specs = list(self.core.registry) if datasource is None else [self.core.owner(datasource)[0]]
        names: list[str] = []
        for spec in specs:
            names.append(spec.name)
            names.extend(r.name for r in spec.rollups)
        if datasource is not None and datasource != specs[0].name:
            return [datasource]
        return names

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]:
        names = None if datasource is None else self.datasource_names(datasource)
        with self.core.catalog.read():
            rows = self.core.catalog.stats_rows(names)
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
        with self.core.catalog.read():
            return self.core.catalog.live_segments(datasource)

    def partition_range(self, datasource: str, partition: str) -> tuple[datetime, datetime]:
        spec, rollup_name = self.core.owner(datasource)
        granularity = (
            spec.rollup(rollup_name).partition if rollup_name else spec.datasource.granularity
        )
        return partition_bounds(partition, granularity, spec)

"""What to compact next: pure decisions over partition statistics and segment lists.

Two kinds of work, in this order:

* **Late** — a partition whose time range ended before the active window (Druid's
  ``skipOffsetFromLatest``) and that holds more than one segment got late writes
  (cancellations of old payments). It is compacted whole, to one segment, once its
  writes have been quiet for the debounce interval — or, if they keep coming, once it
  has been fragmented for ``max_delay_s`` — longest-fragmented first. Every query on
  it pays for the fragmentation until then.
* **Tiered** — a partition inside the active window is still being written, so it is
  never compacted whole; instead its segments are grouped into size tiers (each tier's
  largest segment at most ``tier_ratio`` times its smallest) and any tier with at least
  ``min_merge`` segments is merged, up to ``max_merge`` at a time, smallest tier first.
  A merge's cost is proportional to what it merges, never the partition, and a
  partition written N times holds O(log N) segments.
* **Pack** — last, cold base partitions (ended before the window, one segment each)
  are packed into one file per calendar unit (the month of day partitions): every
  query pays a fixed cost per file it opens, so a year of days should not cost 365
  opens. A unit is packed again when it holds more than one file (a newly cold day,
  or a day a late write re-compacted out of it) — but packing rewrites the whole
  month, so only once the unit has been quiet for ``pack_delay_s`` (late writes into
  it come in bursts; one repack follows the burst), or when it has come apart into
  ``pack_max_files`` files, whichever comes first.

Rollup datasources follow the same rules with their own partition granularity (and
are not packed: their readers keep them summed in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from storage.protocol import CompactionResult, PartitionStats, SegmentInfo

Kind = Literal["late", "tiered", "pack"]


@dataclass(frozen=True)
class PolicyConfig:
    debounce_s: float = 1.0  # a late partition waits until writes were quiet this long
    max_delay_s: float = 5.0  # ...but never longer than this after it fragmented
    min_merge: int = 4  # segments in one tier before it is merged
    max_merge: int = 32  # segments merged at once
    tier_ratio: float = 4.0  # largest / smallest segment size within one tier
    pack_delay_s: float = 600.0  # a unit is repacked once no file of it is younger
    pack_max_files: int = 8  # ...or once it spans this many files
    whole_partitions: bool = False  # a merge rewrites the partition (capabilities)


@dataclass(frozen=True)
class Task:
    datasource: str
    partition: str
    kind: Kind
    segment_ids: tuple[int, ...]
    bytes: int
    due_since: datetime | None  # when the need arose (for detection-to-done times)


def is_due(stats: PartitionStats, ended_before_window: bool) -> bool:
    """Whether ``compaction status`` shows the partition as due: an old partition in
    more than one segment (tiered merges of hot partitions are routine, not "due")."""
    return ended_before_window and stats.segments > 1


def fragmented_since(segments: Sequence[SegmentInfo]) -> datetime | None:
    """When the partition went from one segment to several: the creation time of its
    second-oldest live segment (a compaction's output is the oldest, carrying the
    replaced segments' position)."""
    if len(segments) < 2:
        return None
    second = sorted(segments, key=lambda s: (s.seq, s.id))[1]
    return datetime.fromtimestamp(second.created_at, UTC)


def late_ready(
    stats: PartitionStats,
    segments: Sequence[SegmentInfo],
    now: datetime,
    config: PolicyConfig,
) -> bool:
    since = fragmented_since(segments)
    if since is None:
        return False
    # Every write adds a segment, so the newest one dates the last write (rollup
    # partitions have no write statistics of their own).
    newest = datetime.fromtimestamp(max(s.created_at for s in segments), UTC)
    last = max(newest, stats.last_write_at or newest)
    quiet = (now - last).total_seconds() >= config.debounce_s
    return quiet or (now - since).total_seconds() >= config.max_delay_s


def tiers(segments: Sequence[SegmentInfo], config: PolicyConfig) -> list[list[SegmentInfo]]:
    """Segments grouped by size: sorted ascending, a tier grows while the next segment
    is at most ``tier_ratio`` times the tier's smallest."""
    out: list[list[SegmentInfo]] = []
    for seg in sorted(segments, key=lambda s: (s.bytes, s.seq)):
        if out and seg.bytes <= max(out[-1][0].bytes, 1) * config.tier_ratio:
            out[-1].append(seg)
        else:
            out.append([seg])
    return out


def tiered_merge(segments: Sequence[SegmentInfo], config: PolicyConfig) -> list[SegmentInfo]:
    """The segments to merge next in a hot partition (smallest full tier), or []; only
    sealed ones (a streaming task's are still being written). Where a merge rewrites
    the whole partition, a full tier makes every sealed segment the merge."""
    sealed = [s for s in segments if s.sealed]
    for tier in tiers(sealed, config):
        if len(tier) >= config.min_merge:
            return sealed if config.whole_partitions else tier[: config.max_merge]
    return []


def packs(
    cold: Sequence[tuple[str, str, SegmentInfo]],
    unit_of: Callable[[str, str], str | None],
    now: datetime,
    config: PolicyConfig,
) -> list[Task]:
    """Pack tasks over ``cold`` (datasource, partition, its only segment): one per
    calendar unit whose quiet cold partitions span more than one file."""
    units: dict[tuple[str, str], list[SegmentInfo]] = {}
    for datasource, partition, seg in cold:
        unit = unit_of(datasource, partition)
        if unit is not None:
            units.setdefault((datasource, unit), []).append(seg)
    tasks = []
    for (ds, unit), segs in sorted(units.items()):
        files = len({s.path for s in segs})
        newest = max(datetime.fromtimestamp(s.created_at, UTC) for s in segs)
        quiet = (now - newest).total_seconds()
        if (
            files > 1
            and quiet >= config.debounce_s
            and (quiet >= config.pack_delay_s or files >= config.pack_max_files)
        ):
            ids = tuple(sorted(s.id for s in segs))
            tasks.append(Task(ds, unit, "pack", ids, sum(s.bytes for s in segs), None))
    return tasks


def plan(
    stats: Sequence[PartitionStats],
    segments: Sequence[SegmentInfo],
    now: datetime,
    ended_before_window: Callable[[str, str], bool],
    config: PolicyConfig,
    unit_of: Callable[[str, str], str | None] = lambda ds, p: None,
) -> list[Task]:
    """Every task due now, late ones first (oldest write first), then tiered merges
    (smallest first), then packs. ``unit_of(datasource, partition)`` names the pack a
    partition belongs in (None: never packed)."""
    by_partition: dict[tuple[str, str], list[SegmentInfo]] = {}
    for seg in segments:
        by_partition.setdefault((seg.datasource, seg.partition), []).append(seg)
    late: list[Task] = []
    tiered: list[Task] = []
    cold: list[tuple[str, str, SegmentInfo]] = []
    for st in stats:
        live = by_partition.get((st.datasource, st.partition), [])
        old = ended_before_window(st.datasource, st.partition)
        if old:
            if late_ready(st, live, now, config):
                late.append(_task(st, "late", live, fragmented_since(live)))
            elif len(live) == 1:
                cold.append((st.datasource, st.partition, live[0]))
            continue
        chosen = tiered_merge(live, config)
        if chosen:
            tiered.append(_task(st, "tiered", chosen, st.last_write_at))
    late.sort(key=lambda t: (t.due_since or now, t.datasource, t.partition))
    tiered.sort(key=lambda t: (t.bytes, t.datasource, t.partition))
    return late + tiered + packs(cold, unit_of, now, config)


def _task(
    st: PartitionStats, kind: Kind, chosen: Sequence[SegmentInfo], since: datetime | None
) -> Task:
    ids = tuple(sorted(s.id for s in chosen))
    return Task(st.datasource, st.partition, kind, ids, sum(s.bytes for s in chosen), since)


def ended_before(end: datetime, now: datetime, window: timedelta) -> bool:
    return end <= now - window


@dataclass
class Done:
    task: Task
    result: CompactionResult | None
    finished_at: datetime
    started_at: datetime | None = None  # when the compaction began (an engine's task submitted)

    @property
    def detect_to_done_s(self) -> float | None:
        since = self.task.due_since
        return None if since is None else (self.finished_at - since).total_seconds()

    @property
    def detect_to_start_s(self) -> float | None:
        since, started = self.task.due_since, self.started_at
        return None if since is None or started is None else (started - since).total_seconds()

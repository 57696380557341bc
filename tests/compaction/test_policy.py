"""The compaction policy as pure decisions: tiers, debounce, ordering, and the bound
on segment counts that size-tiered merging gives a partition written forever."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from compaction.policy import PolicyConfig, late_ready, plan, tiered_merge, tiers
from storage.protocol import PartitionStats, SegmentInfo

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
CONFIG = PolicyConfig(
    debounce_s=1.0, max_delay_s=5.0, min_merge=4, max_merge=32, tier_ratio=4, pack_delay_s=300
)


def seg(
    i: int, size: int, *, part: str = "2026-11-30", ds: str = "payments", age_s: float = 60
) -> SegmentInfo:
    created = (NOW - timedelta(seconds=age_s)).timestamp()
    return SegmentInfo(i, ds, part, f"/x/{i}.parquet", size, size, i, created)


def stats(
    part: str, segments: int, *, ds: str = "payments", last_write_s: float | None = 60
) -> PartitionStats:
    last = None if last_write_s is None else NOW - timedelta(seconds=last_write_s)
    return PartitionStats(ds, part, segments, 0, 0, 0, last, None)


def test_tiers_group_segments_of_similar_size() -> None:
    segments = [seg(1, 10), seg(2, 30), seg(3, 41), seg(4, 200), seg(5, 700), seg(6, 5_000)]
    assert [[s.id for s in t] for t in tiers(segments, CONFIG)] == [[1, 2], [3], [4, 5], [6]]


def test_the_smallest_full_tier_is_merged_first() -> None:
    small = [seg(i, 10 + i) for i in range(1, 6)]
    large = [seg(i, 10_000 + i) for i in range(10, 16)]
    assert {s.id for s in tiered_merge(small + large, CONFIG)} == {1, 2, 3, 4, 5}
    assert tiered_merge(small[:3] + large[:3], CONFIG) == []


def test_a_streaming_tasks_segment_is_never_merged_and_whole_partitions_take_all() -> None:
    compacted = seg(1, 10_000)
    small = [seg(i, 10 + i) for i in range(2, 6)]
    held = replace(seg(9, 12), sealed=False)  # still in a streaming task
    assert {s.id for s in tiered_merge([compacted, *small, held], CONFIG)} == {2, 3, 4, 5}
    whole = replace(CONFIG, whole_partitions=True)  # Druid: a compaction is a whole chunk
    assert {s.id for s in tiered_merge([compacted, *small, held], whole)} == {1, 2, 3, 4, 5}
    assert tiered_merge([compacted, *small[:3], held], whole) == []  # no tier is full


def test_a_late_partition_waits_for_quiet_but_not_forever() -> None:
    fragmented = [seg(1, 100, age_s=3), seg(2, 10, age_s=2)]
    assert not late_ready(stats("d", 2, last_write_s=0.5), fragmented, NOW, CONFIG)
    assert late_ready(stats("d", 2, last_write_s=1.5), fragmented, NOW, CONFIG)
    still_written_long = [seg(1, 100, age_s=30), seg(2, 10, age_s=6)]
    assert late_ready(stats("d", 2, last_write_s=0.1), still_written_long, NOW, CONFIG)
    assert not late_ready(stats("d", 1), [seg(1, 100)], NOW, CONFIG)


def test_late_partitions_come_first_then_small_merges() -> None:
    old = {"2026-01-01", "2026-01-02"}
    segments = [
        seg(1, 100, part="2026-01-01", age_s=50),
        seg(2, 5, part="2026-01-01", age_s=20),
        seg(3, 100, part="2026-01-02", age_s=50),
        seg(4, 5, part="2026-01-02", age_s=40),  # fragmented earlier: goes first
        *(seg(10 + i, 5, part="2026-11-30") for i in range(4)),
    ]
    tasks = plan(
        [stats("2026-01-01", 2), stats("2026-01-02", 2), stats("2026-11-30", 4, last_write_s=0)],
        segments,
        NOW,
        lambda _ds, part: part in old,
        CONFIG,
    )
    assert [(t.partition, t.kind) for t in tasks] == [
        ("2026-01-02", "late"),
        ("2026-01-01", "late"),
        ("2026-11-30", "tiered"),
    ]
    assert tasks[0].segment_ids == (3, 4)
    assert tasks[2].segment_ids == (10, 11, 12, 13)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=400),
    min_merge=st.integers(2, 8),
)
def test_a_partition_written_forever_keeps_logarithmically_many_segments(
    sizes: list[int], min_merge: int
) -> None:
    """Append segments, letting the policy merge after each append as the watcher
    would: the segment count stays O(min_merge · log N) and no byte is lost."""
    config = PolicyConfig(min_merge=min_merge, max_merge=32, tier_ratio=4)
    live: list[SegmentInfo] = []
    next_id = 0
    for size in sizes:
        next_id += 1
        live.append(seg(next_id, size))
        while chosen := tiered_merge(live, config):
            ids = {s.id for s in chosen}
            next_id += 1
            live = [s for s in live if s.id not in ids] + [
                seg(next_id, sum(s.bytes for s in chosen))
            ]
    assert sum(s.bytes for s in live) == sum(sizes)
    total = sum(sizes)
    levels = math.log(max(total, 2), 4) + 2  # tiers span a factor of 4 each
    assert len(live) <= (min_merge - 1) * levels + 1


def _month(ds: str, part: str) -> str | None:
    return part[:7] if ds == "payments" else None


def _cold(i: int, part: str, *, path: str | None = None, age_s: float = 1000) -> SegmentInfo:
    s = seg(i, 100, part=part, age_s=age_s)
    return SegmentInfo(s.id, s.datasource, s.partition, path or s.path, 100, 100, i,
                       s.created_at, packed=path is not None)  # fmt: skip


def _plan_all(segments: list[SegmentInfo], config: PolicyConfig = CONFIG) -> list[Any]:
    parts = sorted({(s.datasource, s.partition) for s in segments})
    counts = {p: sum((s.datasource, s.partition) == p for s in segments) for p in parts}
    st = [stats(p, counts[(ds, p)], ds=ds) for ds, p in parts]
    return plan(st, segments, NOW, lambda ds, p: True, config, _month)


def test_cold_partitions_are_packed_by_month_until_one_file_holds_each_month() -> None:
    segments = [
        _cold(1, "2026-01-30"),
        _cold(2, "2026-01-31"),
        _cold(3, "2026-02-01", path="/p.parquet"),  # February is one pack already
        _cold(4, "2026-02-02", path="/p.parquet"),
        _cold(5, "2026-03-01"),
        _cold(6, "2026-03-02", age_s=20),  # written 20 s ago: March is not quiet yet
        seg(7, 100, part="2026-04-01"),  # April: fragmented (late), compacted first
        seg(8, 10, part="2026-04-01", age_s=30),
        seg(9, 100, part="2026-04-02", age_s=1000),
        seg(10, 100, part="2026-04-03", age_s=1000),
        seg(11, 100, part="2026-01-01", ds="payments_daily"),  # rollups are never packed
        seg(12, 100, part="2026-01-02", ds="payments_daily"),
    ]
    tasks = _plan_all(segments)
    assert [(t.kind, t.datasource, t.partition) for t in tasks] == [
        ("late", "payments", "2026-04-01"),
        ("pack", "payments", "2026-01"),
        ("pack", "payments", "2026-04"),
    ]
    assert tasks[1].segment_ids == (1, 2) and tasks[2].segment_ids == (9, 10)
    assert tasks[1].bytes == 200
    # Nothing is packed without a unit, nor inside the active window.
    parts = sorted({(s.datasource, s.partition) for s in segments})
    counts = {p: sum((s.datasource, s.partition) == p for s in segments) for p in parts}
    st = [stats(p, counts[(ds, p)], ds=ds) for ds, p in parts]
    assert [t.kind for t in plan(st, segments, NOW, lambda ds, p: True, CONFIG)] == ["late"]
    assert all(
        t.kind != "pack" for t in plan(st, segments, NOW, lambda ds, p: False, CONFIG, _month)
    )


def test_a_month_is_repacked_after_a_quiet_spell_or_once_it_came_apart() -> None:
    """Repacking rewrites the month: a burst of late writes is followed by one repack,
    not one per written day."""
    pack = [_cold(i, f"2026-01-{i:02d}", path="/p.parquet", age_s=3600) for i in range(1, 20)]
    written = [_cold(i, f"2026-01-{i:02d}", age_s=30) for i in range(20, 23)]  # re-compacted
    assert _plan_all(pack + written) == []  # still in its burst
    quiet = [_cold(i, f"2026-01-{i:02d}", age_s=CONFIG.pack_delay_s + 1) for i in range(20, 23)]
    (task,) = _plan_all(pack + quiet)
    assert (task.kind, task.partition, len(task.segment_ids)) == ("pack", "2026-01", 22)
    apart = [_cold(i, f"2026-01-{i:02d}", age_s=30) for i in range(20, 27)]  # 7 files + pack
    (task,) = _plan_all(pack + apart)
    assert len(task.segment_ids) == 26
    loud = [_cold(i, f"2026-01-{i:02d}", age_s=0.2) for i in range(20, 27)]
    assert _plan_all(pack + loud) == []  # even then, not while it is being written

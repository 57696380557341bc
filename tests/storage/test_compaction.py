"""The compaction primitive: atomic replacement, concurrent appends, grace, orphans."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from storage import OlapReader, open_reader, open_store
from storage.embedded.store import EmbeddedStore
from tally.errors import CompactionConflict
from tally.settings import Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.factories import T0, payment

DAY = "2026-01-01"  # T0 + 3h is 12:00 in Seoul, same day


def _fragment(store: EmbeddedStore, commits: int) -> None:
    """``commits`` commits into one day: new keys and cancellations of earlier ones."""
    at = T0 + timedelta(hours=3)
    for i in range(commits):
        rows = [payment(f"t{i}", approved_at=at, merchant_id=f"m{i % 2}")]
        if i:
            rows.append(
                payment(
                    f"t{i - 1}",
                    2,
                    approved_at=at,
                    canceled_amount=4_000,
                    merchant_id=f"m{(i - 1) % 2}",
                )
            )
        store.commit("payments", rows)


def _snapshot(reader: OlapReader) -> tuple[object, ...]:
    base = reader.query("SELECT txn_id, version, status FROM payments ORDER BY 1").rows
    hourly = reader.query("SELECT * FROM payments_hourly ORDER BY ALL").rows
    daily = reader.query("SELECT * FROM payments_daily ORDER BY ALL").rows
    return (base, hourly, daily)


def test_compaction_replaces_a_fragmented_partition_with_one_deduplicated_segment(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    _fragment(store, 12)
    before = _snapshot(reader)
    assert len(store.live_segments("payments")) == 12
    result = store.compactor.compact("payments", DAY)
    assert result is not None
    assert (result.replaced_segments, result.rows_in, result.rows_out) == (12, 23, 12)
    assert len(store.live_segments("payments")) == 1
    assert reader.query("SELECT count(*) FROM raw.payments").rows == [[12]]
    for rollup in ("payments_hourly", "payments_daily"):
        store.compactor.compact(rollup, "2026-01")
        assert len(store.live_segments(rollup)) == 1
    assert _snapshot(reader) == before
    stats = {s.datasource: s for s in store.partition_stats("payments")}
    assert stats["payments"].last_compacted_at is not None
    assert stats["payments"].late_rows == 0


def test_segments_committed_meanwhile_stay_live(store: EmbeddedStore, reader: OlapReader) -> None:
    _fragment(store, 4)
    chosen = [s.id for s in store.live_segments("payments")]  # what a compactor picked
    _fragment_more = payment(
        "t3", 3, approved_at=T0 + timedelta(hours=3), canceled_amount=10_000, merchant_id="m1"
    )
    store.commit("payments", [_fragment_more])  # lands while the compactor works
    result = store.compactor.compact("payments", DAY, chosen)
    assert result is not None and result.replaced_segments == 4
    live = store.live_segments("payments")
    assert len(live) == 2
    assert reader.query("SELECT version, status FROM payments WHERE txn_id = 't3'").rows == [
        [3, "CANCELED"]
    ]


def test_overlapping_compactions_conflict_and_leave_nothing_behind(
    store: EmbeddedStore, data_dir: Path
) -> None:
    _fragment(store, 3)
    ids = [s.id for s in store.live_segments("payments")]
    store.compactor.compact("payments", DAY, ids[:2])
    files = set(data_dir.rglob("*.parquet"))
    with pytest.raises(CompactionConflict) as caught:
        store.compactor.compact("payments", DAY, ids[1:])
    assert caught.value.transient
    assert set(data_dir.rglob("*.parquet")) == files


def test_replaced_files_outlive_the_grace_period_only(
    data_dir: Path, registry: SpecRegistry
) -> None:
    patient = Settings(data_dir=data_dir, store=StoreSettings(gc_grace_s=3600))
    store = open_store(patient, registry)
    assert isinstance(store, EmbeddedStore)
    reader = open_reader(patient, registry)
    _fragment(store, 3)
    old_files = [Path(s.path) for s in store.live_segments("payments")]
    reader.refresh()
    store.compactor.compact("payments", DAY)
    assert store.compactor.collect_garbage() == 0
    assert all(p.exists() for p in old_files)  # a query bound to them still works
    eager = open_store(Settings(data_dir=data_dir, store=StoreSettings(gc_grace_s=0)), registry)
    time.sleep(0.01)  # replaced_at must be strictly in the past for a zero grace
    assert eager.compactor.collect_garbage() >= 3
    assert not any(p.exists() for p in old_files)
    assert reader.query("SELECT count(*) FROM payments").rows == [[3]]
    for closer in (store, eager, reader):
        closer.close()


def test_orphans_are_removed_only_past_their_grace(store: EmbeddedStore, data_dir: Path) -> None:
    store.commit("payments", [payment("a")])
    orphan = data_dir / "segments" / "payments" / DAY / "crashed-before-commit.parquet"
    orphan.write_bytes(b"PAR1 half a file")
    assert store.compactor.collect_garbage(orphan_grace_s=3600) == 0
    assert orphan.exists()
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    assert store.compactor.collect_garbage(orphan_grace_s=3600) == 1
    assert not orphan.exists()
    assert all(Path(s.path).exists() for s in store.live_segments())


def test_rollup_compaction_sums_deltas_and_drops_groups_that_net_to_zero(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    at = T0 + timedelta(hours=3)
    store.commit("payments", [payment("a", approved_at=at, method="CARD")])
    store.commit("payments", [payment("a", 2, approved_at=at, method="TRANSFER")])
    # payments_hourly now holds +CARD, then -CARD +TRANSFER: CARD nets to zero.
    assert reader.query("SELECT count(*) FROM raw.payments_hourly").rows == [[3]]
    store.compactor.compact("payments_hourly", "2026-01")
    rows = reader.query("SELECT method, count FROM raw.payments_hourly").rows
    assert rows == [["TRANSFER", 1]]


def test_compacting_a_subset_reads_only_that_subset(store: EmbeddedStore) -> None:
    _fragment(store, 6)
    live = store.live_segments("payments")
    chosen = live[:2]
    result = store.compactor.compact("payments", DAY, [s.id for s in chosen])
    assert result is not None
    assert result.rows_in == sum(s.rows for s in chosen)
    assert result.bytes_in == sum(s.bytes for s in chosen)
    assert len(store.live_segments("payments")) == 5

"""Packs: cold partitions in one file, each still its own partition.

A pack must change no answer — merged view, lookups, rollups, a writer's key index —
and a late write into a packed day must behave as in any other partition; the pack's
file goes only when no partition reads it any more."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from storage import OlapReader, open_store
from storage.embedded.catalog import SCHEMA_VERSION, Catalog
from storage.embedded.store import EmbeddedStore
from tally.errors import CompactionConflict, InvalidArgument
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.factories import T0, normalise, payment

COLUMNS = "txn_id, version, merchant_id, status, amount, canceled_amount, approved_at"


def _history() -> list[dict[str, Any]]:
    """Three payments a day for 40 days (two merchants), some canceled the same day."""
    rows = []
    for day in range(40):
        for i in range(3):
            txn = f"t{day:02d}{i}"
            at = T0 + timedelta(days=day, hours=3 * i)
            merchant = "m1" if i else "m2"
            rows.append(payment(txn, merchant_id=merchant, approved_at=at, amount=1000 * (i + 1)))
            if i == 2:
                rows.append(payment(txn, 2, merchant_id=merchant, approved_at=at, amount=3000,
                                    canceled_amount=3000))  # fmt: skip
    return rows


def _state(reader: OlapReader) -> dict[str, Any]:
    return {
        "merged": sorted(
            tuple(normalise(v) for v in r)
            for r in reader.query(f"SELECT {COLUMNS} FROM payments").rows
        ),
        "rollup": sorted(
            tuple(normalise(v) for v in r)
            for r in reader.query("SELECT * FROM payments_daily").rows
        ),
        "raw_live": reader.query("SELECT count(*) FROM raw.payments WHERE NOT _deleted").rows,
        "lookup": sorted(
            r["txn_id"]
            for r in reader.lookup(
                "payments", ["t050", "t051", "t052", "t352"], tenant="m1", partitions=["2026-01-06"]
            ).to_pylist()
        ),
    }


def _pack_all(store: EmbeddedStore) -> None:
    live = store.live_segments("payments")
    counts: dict[str, int] = {}
    for seg in live:
        counts[seg.partition] = counts.get(seg.partition, 0) + 1
    store.compactor.pack("payments", [s.id for s in live if counts[s.partition] == 1])


def _files(settings: Settings) -> set[Path]:
    return set((settings.data_dir / "segments" / "payments").rglob("*.parquet"))


def test_a_pack_changes_no_answer(
    store: EmbeddedStore, reader: OlapReader, settings: Settings, registry: SpecRegistry
) -> None:
    rows = _history()
    for i in range(0, len(rows), 25):
        store.commit("payments", rows[i : i + 25])
    for part in {s.partition for s in store.live_segments("payments")}:
        store.compactor.compact("payments", part)
    before = _state(reader)
    assert before["lookup"] == ["t051", "t052"]
    _pack_all(store)
    store.compactor.collect_garbage()
    live = store.live_segments("payments")
    assert len(live) == 40 and all(s.packed for s in live)
    assert len({s.path for s in live}) == 1 and len(_files(settings)) == 1
    assert sum(s.rows for s in live) == 120
    assert _state(reader) == before
    # A writer started afresh rebuilds its key index from the pack: a replay is a no-op.
    fresh = open_store(settings, registry)
    assert fresh.commit("payments", rows).rows_written == 0
    fresh.close()


def test_a_late_write_into_a_packed_day_then_its_compaction_and_a_repack(
    store: EmbeddedStore, reader: OlapReader, settings: Settings
) -> None:
    rows = _history()
    store.commit("payments", rows)
    for part in {s.partition for s in store.live_segments("payments")}:
        store.compactor.compact("payments", part)
    _pack_all(store)
    store.compactor.collect_garbage()
    (pack,) = _files(settings)
    days = [p for group in reader.partition_groups("payments") for p in group]
    assert reader.partition_groups("payments") == [days]  # one pack: one read
    late = payment("t051", 2, merchant_id="m1", approved_at=T0 + timedelta(days=5, hours=3),
                   amount=2000, canceled_amount=500)  # fmt: skip
    store.commit("payments", [late])
    day = "2026-01-06"  # T0 + 5 days + 3 h, in Seoul
    assert len(store.live_segments("payments")) == 41
    at = days.index(day)  # the fragmented day is read on its own now
    assert reader.partition_groups("payments") == [days[:at], [day], days[at + 1 :]]
    got = reader.query("SELECT status, canceled_amount FROM payments WHERE txn_id = 't051'").rows
    assert got == [["PARTIAL_CANCELED", 500]]
    assert reader.query("SELECT count(*) FROM payments").rows == [[120]]
    result = store.compactor.compact("payments", day)
    assert result is not None and result.rows_out == 3  # that day's rows only
    store.compactor.collect_garbage()
    assert pack in _files(settings)  # still read by the 39 other days
    assert reader.query("SELECT count(*) FROM payments").rows == [[120]]
    _pack_all(store)  # the month again, now with the re-compacted day
    store.compactor.collect_garbage()
    assert pack not in _files(settings)  # no partition reads the old pack any more
    assert len(_files(settings)) == 1
    assert reader.query("SELECT canceled_amount FROM payments WHERE txn_id = 't051'").rows == [
        [500]
    ]
    assert reader.query("SELECT count(*) FROM payments").rows == [[120]]


def test_only_single_segment_base_partitions_are_packed(store: EmbeddedStore) -> None:
    store.commit(
        "payments", [payment("a", approved_at=T0), payment("b", approved_at=T0 + timedelta(days=1))]
    )
    store.commit("payments", [payment("a", 2, approved_at=T0, canceled_amount=10_000)])
    live = store.live_segments("payments")
    with pytest.raises(CompactionConflict):
        store.compactor.pack("payments", [s.id for s in live])  # one day holds two segments
    with pytest.raises(InvalidArgument):
        store.compactor.pack(
            "payments_daily", [s.id for s in store.live_segments("payments_daily")]
        )


def test_a_version_1_catalog_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
        INSERT INTO meta VALUES ('schema_version', 1), ('generation', 7), ('seq', 3);
        CREATE TABLE segments (
            id INTEGER PRIMARY KEY AUTOINCREMENT, datasource TEXT NOT NULL,
            partition TEXT NOT NULL, path TEXT NOT NULL UNIQUE, rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL, seq INTEGER NOT NULL, created_at REAL NOT NULL,
            replaced_at REAL);
        INSERT INTO segments (datasource, partition, path, rows, bytes, seq, created_at)
            VALUES ('payments', '2026-01-01', '/a.parquet', 5, 50, 3, 1.0);
        """
    )
    con.commit()
    con.close()
    catalog = Catalog(path)
    try:
        with catalog.read():
            (seg,) = catalog.live_segments()
            assert catalog.generation() == 7
        assert (seg.partition, seg.path, seg.rows, seg.packed) == (
            "2026-01-01",
            "/a.parquet",
            5,
            False,
        )
        with catalog.write() as c:
            version = c.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()[0]
            assert version == SCHEMA_VERSION
            catalog.add_pack("payments", [seg.id], "/p.parquet", {"2026-01-01": 5}, 40)
        with catalog.read():
            (packed,) = catalog.live_segments()
        assert packed.packed and packed.path == "/p.parquet" and packed.seq == 3
    finally:
        catalog.close()

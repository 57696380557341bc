"""Segment files checked against what the catalog recorded when they were written
(``storage.embedded.integrity``), damaged partitions isolated by the reader, and
restored whole (``storage.embedded.restore``); a catalog from before digests."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import OlapReader
from storage.embedded.catalog import SCHEMA_VERSION, Catalog
from storage.embedded.integrity import check_files
from storage.embedded.segments import file_digest
from storage.embedded.store import EmbeddedStore
from tally.errors import PartitionDamaged
from tests.factories import T0, payment

DAY = timedelta(days=1)


def _days(store: EmbeddedStore) -> list[dict[str, object]]:
    rows = [
        payment(f"p{d}{i}", approved_at=T0 + d * DAY, amount=100 * (i + 1))
        for d in range(3)
        for i in range(4)
    ]
    store.commit("payments", rows)
    return rows


def _file(store: EmbeddedStore, partition: str) -> Path:
    (seg,) = [s for s in store.live_segments("payments") if s.partition == partition]
    return Path(seg.path)


def test_a_written_segment_records_its_size_and_digest(store: EmbeddedStore) -> None:
    _days(store)
    with store.core.catalog.read():
        records = store.core.catalog.file_records("payments")
    assert records
    for r in records:
        path = Path(r.path)
        assert r.file_bytes == path.stat().st_size and r.digest == file_digest(path)
    assert store.check_files(full=True, found_by="test") == []


def test_sizes_find_a_loss_or_a_truncation_and_digests_a_flipped_bit(
    store: EmbeddedStore,
) -> None:
    _days(store)
    lost, cut, flipped = (_file(store, p) for p in ("2026-01-01", "2026-01-02", "2026-01-03"))
    lost.unlink()
    cut.write_bytes(cut.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    quick = {(d.partition, d.reason) for d in store.check_files(full=False, found_by="test")}
    assert {p for p, _ in quick} == {"2026-01-01", "2026-01-02"}
    assert ("2026-01-01", "file missing") in quick
    full = {d.partition: d for d in store.check_files(full=True, found_by="verify")}
    assert set(full) == {"2026-01-01", "2026-01-02", "2026-01-03"}
    assert full["2026-01-03"].reason == "file content altered"
    assert full["2026-01-01"].found_by == "test"  # recorded once, by whoever found it first
    assert all("/" not in d.reason for d in full.values())


def test_the_reader_leaves_a_damaged_partition_out_and_refuses_what_reads_it(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    rows = _days(store)
    _file(store, "2026-01-02").unlink()
    assert reader.damaged() == {"payments": {"2026-01-02": "file missing"}}
    day3 = reader.query(
        "SELECT count(*) FROM payments WHERE approved_at >= '2026-01-02T15:00:00+00:00'"
    ).rows
    assert day3 == [[4]]
    with pytest.raises(PartitionDamaged, match="2026-01-02"):
        reader.query("SELECT count(*) FROM payments")
    with pytest.raises(PartitionDamaged, match="2026-01-02"):
        reader.lookup("payments", ["p10"])
    assert reader.lookup("payments", ["p20"], partitions=["2026-01-03"]).num_rows == 1
    healthy = reader.relation("payments", skip_damaged=True).sql("duckdb")
    everything_else = reader.arrow(f"SELECT count(*) AS n FROM ({healthy})")
    assert everything_else.column("n").to_pylist() == [8]

    # Restored whole: the reader serves it again, the damage record is gone.
    day2 = [r for r in rows if str(r["txn_id"]).startswith("p1")]
    store.check_files(full=False, found_by="test")
    store.restore_partitions("payments", {"2026-01-02": pa.Table.from_pylist(day2)})
    assert store.check_files(full=True, found_by="test") == []
    assert reader.query("SELECT count(*) FROM payments").rows == [[12]]


def test_a_v3_catalog_gains_digests_and_its_old_segments_are_checked_by_their_footer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "catalog.sqlite"
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), good)
    bad.write_bytes(b"not parquet at all")
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', 3), ('generation', 0), ('seq', 1);"
        "CREATE TABLE segments (id INTEGER PRIMARY KEY AUTOINCREMENT, datasource TEXT NOT NULL,"
        " partition TEXT NOT NULL, path TEXT NOT NULL, rows INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, seq INTEGER NOT NULL, created_at REAL NOT NULL,"
        " replaced_at REAL, packed INTEGER NOT NULL DEFAULT 0, UNIQUE (path, partition));"
        f"INSERT INTO segments VALUES (1, 'payments', '2026-01-01', '{good}', 2, 9, 1, 0, NULL, 0);"
        f"INSERT INTO segments VALUES (2, 'payments', '2026-01-02', '{bad}', 2, 9, 1, 0, NULL, 0);"
    )
    con.commit()
    con.close()
    catalog = Catalog(path)
    try:
        with catalog.read():
            version = catalog._con.execute("SELECT v FROM meta WHERE k='schema_version'")
            assert version.fetchone()[0] == SCHEMA_VERSION == 4
            assert {r.digest for r in catalog.file_records()} == {None}
        assert check_files(catalog, full=False, found_by="test") == []  # no size to compare
        (found,) = check_files(catalog, full=True, found_by="test")
        assert found.partition == "2026-01-02" and "cannot be read" in found.reason
    finally:
        catalog.close()

"""Commit semantics: fencing, version guard, tombstones, statistics, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from storage import OffsetRange, OlapReader
from storage.embedded.segments import base_schema
from storage.embedded.store import EmbeddedStore
from tally.errors import InvalidRow, OffsetMismatch, TallyError
from tally.specs import DatasourceSpec
from tests.factories import T0, payment

TP = ("payments.v1", 0)


def _count(reader: OlapReader, sql: str) -> int:
    value = reader.query(sql).rows[0][0]
    assert isinstance(value, int)
    return value


def test_offsets_are_stored_with_the_data_and_a_stale_start_is_fenced(
    store: EmbeddedStore, reader: OlapReader, data_dir: Path
) -> None:
    store.commit("payments", [payment("a")], {TP: OffsetRange(0, 1)})
    store.commit("payments", [payment("b")], {TP: OffsetRange(1, 2)})
    assert store.stored_offsets("payments") == {TP: 2}
    files_before = sorted(p.name for p in data_dir.rglob("*.parquet"))

    # A zombie that still believes it resumes at offset 1 is rejected...
    with pytest.raises(OffsetMismatch) as caught:
        store.commit("payments", [payment("zombie")], {TP: OffsetRange(1, 2)})
    assert "payments.v1[0] starts at 1 but the catalog is at 2" in str(caught.value)
    assert not caught.value.transient
    # ...and leaves nothing behind: no rows, no files, offsets unchanged.
    assert _count(reader, "SELECT count(*) FROM payments WHERE txn_id = 'zombie'") == 0
    assert sorted(p.name for p in data_dir.rglob("*.parquet")) == files_before
    assert store.stored_offsets("payments") == {TP: 2}


def test_zombie_writer_in_another_instance_is_fenced(
    store: EmbeddedStore, settings: object, registry: object
) -> None:
    from storage import open_store

    store.commit("payments", [payment("a")], {TP: OffsetRange(0, 5)})
    other = open_store(settings, registry)  # type: ignore[arg-type]
    other.commit("payments", [payment("b")], {TP: OffsetRange(5, 9)})  # the new owner
    with pytest.raises(OffsetMismatch):
        store.commit("payments", [payment("c")], {TP: OffsetRange(5, 7)})  # the old one
    other.close()


def test_offsets_of_several_partitions_commit_together(store: EmbeddedStore) -> None:
    other = ("payments.v1", 3)
    store.commit("payments", [payment("a")], {TP: OffsetRange(0, 4), other: OffsetRange(10, 12)})
    with pytest.raises(OffsetMismatch):  # one bad start fences the whole commit
        store.commit(
            "payments", [payment("b")], {TP: OffsetRange(4, 5), other: OffsetRange(11, 13)}
        )
    assert store.stored_offsets("payments") == {TP: 4, other: 12}


def test_an_empty_batch_still_moves_offsets(store: EmbeddedStore) -> None:
    result = store.commit("payments", [], {TP: OffsetRange(0, 7)})  # e.g. all dead-lettered
    assert result.rows_written == 0 and result.segments == 0
    assert store.stored_offsets("payments") == {TP: 7}


def test_stale_versions_and_redeliveries_change_nothing(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    store.commit("payments", [payment("a", 2, canceled_amount=10_000)])
    result = store.commit("payments", [payment("a", 1), payment("a", 2, canceled_amount=10_000)])
    assert (result.stale_rows, result.rows_written, result.segments) == (2, 0, 0)
    rows = reader.query("SELECT version, status FROM payments").rows
    assert rows == [[2, "CANCELED"]]


def test_equal_versions_resolve_by_greater_event_id_whatever_the_order(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    low = payment("a", 3, event_id="e-1", method="CARD")
    high = payment("a", 3, event_id="e-2", method="TRANSFER")
    store.commit("payments", [high])
    store.commit("payments", [low])
    store.commit("payments", [low, high])
    assert reader.query("SELECT event_id, method FROM payments").rows == [["e-2", "TRANSFER"]]


def test_late_cancellation_lands_in_its_old_partition_and_is_counted_late(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    old = now - timedelta(days=30)
    store.commit("payments", [payment("a", approved_at=old)], now=old)
    result = store.commit(
        "payments", [payment("a", 2, approved_at=old, canceled_amount=10_000)], now=now
    )
    assert result.late_rows == 1
    stats = {(s.datasource, s.partition): s for s in store.partition_stats("payments")}
    partition = stats["payments", "2026-01-30"]  # 21:00 in Seoul, same day
    assert (partition.segments, partition.late_rows) == (2, 1)
    assert reader.query("SELECT status FROM payments").rows == [["CANCELED"]]


def test_a_key_that_moves_partition_is_hidden_where_it_was(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    store.commit("payments", [payment("a", approved_at=T0)])
    result = store.commit("payments", [payment("a", 2, approved_at=T0 + timedelta(days=3))])
    assert result.tombstones == 1
    assert reader.query("SELECT txn_id, approved_at FROM payments").rows == [
        ["a", T0 + timedelta(days=3)]
    ]
    deleted = reader.query("SELECT count(*) FROM raw.payments WHERE _deleted").rows
    assert deleted == [[1]]


def test_partitions_are_calendar_days_in_the_datasource_zone(store: EmbeddedStore) -> None:
    # 2026-01-01 15:30 UTC is 2026-01-02 00:30 in Seoul.
    result = store.commit("payments", [payment("a", approved_at=T0 + timedelta(hours=15.5))])
    assert result.partitions == ("2026-01-02",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"txn_id": None}, "txn_id"),
        ({"approved_at": datetime(2026, 1, 1)}, "timezone"),  # naive time
        ({"amount": "12.5"}, "schema"),
        ({"version": None}, "version"),
    ],
)
def test_bad_rows_are_rejected_with_a_reason_and_write_nothing(
    store: EmbeddedStore,
    reader: OlapReader,
    data_dir: Path,
    change: dict[str, object],
    message: str,
) -> None:
    bad = payment("a") | change
    with pytest.raises(InvalidRow) as caught:
        store.commit("payments", [payment("ok"), bad], {TP: OffsetRange(0, 2)})
    assert message in str(caught.value)
    assert isinstance(caught.value, TallyError) and not caught.value.transient
    assert _count(reader, "SELECT count(*) FROM payments") == 0
    assert not list(data_dir.rglob("*.parquet"))
    assert store.stored_offsets("payments") == {}


def test_arrow_batches_commit_like_rows(
    store: EmbeddedStore, reader: OlapReader, payments_spec: DatasourceSpec
) -> None:
    schema = base_schema(payments_spec)
    rows = [payment(f"t{i}", merchant_id=f"m{i % 3}") for i in range(50)]
    table = pa.Table.from_pylist(rows, schema=schema).drop_columns(["_deleted"])
    result = store.commit("payments", table)
    assert result.rows_written == 50
    by_merchant = reader.query(
        "SELECT merchant_id, count(*) FROM payments GROUP BY 1 ORDER BY 1"
    ).rows
    assert by_merchant == [["m0", 17], ["m1", 17], ["m2", 16]]

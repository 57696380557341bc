"""``tally rollups rebuild`` finds a corrupted rollup and repairs it from the base."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage import OlapReader
from storage.embedded.catalog import NewSegment
from storage.embedded.segments import to_table
from storage.embedded.store import EmbeddedStore
from storage.schema import rollup_schema
from tally.specs import DatasourceSpec
from tests.cli import tally
from tests.factories import latest_by_key, normalise, payment, reference_rollup


def _corrupt(store: EmbeddedStore, spec: DatasourceSpec, at: datetime) -> None:
    """Slip a bogus delta into payments_hourly, as a bug or bad repair might."""
    rollup = spec.rollup("payments_hourly")
    bogus = {
        "bucket": at,
        "merchant_id": "m1",
        "method": "CARD",
        "status": "DONE",
        "currency": "KRW",
        "count": 3,
        "gross_amount": 999,
        "canceled_amount": 0,
        "net_amount": 999,
    }
    path, size, _digest = store.core.segments.write(
        to_table([bogus], rollup_schema(spec, rollup)),
        rollup.name,
        "2026-01",
        [("bucket", "ascending")],
    )
    with store.core.catalog.write():
        store.core.catalog.add_segments([NewSegment(rollup.name, "2026-01", str(path), 1, size)])
        store.core.catalog.bump_generation()


def _hourly(reader: OlapReader) -> dict[tuple[object, ...], tuple[int, ...]]:
    rows = reader.query("SELECT * FROM payments_hourly").rows
    return {tuple(normalise(v) for v in r[:5]): tuple(r[5:]) for r in rows}


def test_rebuild_reports_and_repairs_a_corrupted_rollup(
    store: EmbeddedStore, reader: OlapReader, data_dir: Path, payments_spec: DatasourceSpec
) -> None:
    at = datetime(2026, 1, 10, 3, tzinfo=UTC)
    events = [payment(f"t{i}", approved_at=at + timedelta(minutes=i)) for i in range(5)]
    events.append(payment("t0", 2, approved_at=at, canceled_amount=4000))
    store.commit("payments", events)
    latest = latest_by_key(payments_spec, events)
    expected = {
        tuple(normalise(v) for v in k): v
        for k, v in reference_rollup(payments_spec, "payments_hourly", latest).items()
    }
    assert _hourly(reader) == expected

    _corrupt(store, payments_spec, at.replace(minute=0))
    assert _hourly(reader) != expected

    ran = tally(
        "rollups", "rebuild", "--partition", "2026-01-10", "--format", "json", data_dir=data_dir
    )
    assert ran.code == 0, ran.err
    reports = {r["rollup"]: r for r in ran.json()["rebuilt"]}
    assert reports["payments_hourly"]["groups_repaired"] == 1
    assert reports["payments_hourly"]["differences"][0]["gross_amount"] == -999
    assert reports["payments_daily"]["groups_repaired"] == 0
    assert _hourly(reader) == expected

    again = tally("rollups", "rebuild", "--format", "json", data_dir=data_dir)
    assert [r["groups_repaired"] for r in again.json()["rebuilt"]] == [0, 0]

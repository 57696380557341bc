"""The synthetic payments generator: deterministic, realistic, and true to the contract."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pyarrow as pa
import pytest

from producers.generate import (
    CARD_COMPANIES,
    METHODS,
    GeneratorConfig,
    approval_tables,
    arrow_schema,
    cancellations_for,
    generate_events,
    generate_tables,
)
from storage import OlapReader
from storage.embedded.store import EmbeddedStore
from tally.specs import DatasourceSpec
from tests.factories import latest_by_key

CONFIG = GeneratorConfig(
    transactions=4_000,
    merchants=40,
    days=6,
    seed=7,
    cancel_rate=0.3,
    duplicate_rate=0.05,
    out_of_order_rate=0.3,
)
EVENT_TYPE_OF_STATUS = {
    "DONE": "payment.approved",
    "PARTIAL_CANCELED": "payment.partially_canceled",
    "CANCELED": "payment.canceled",
}


def _time(text: str) -> datetime:
    assert text.endswith("Z"), text
    value = datetime.fromisoformat(text)
    assert value.utcoffset() == timedelta(0)
    return value


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return list(generate_events(CONFIG))


@pytest.fixture(scope="module")
def by_txn(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Distinct events of each payment, by version."""
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for e in events:
        out[e["txn_id"]][e["event_id"]] = e
    return {k: sorted(v.values(), key=lambda e: e["version"]) for k, v in out.items()}


def test_same_seed_same_events_other_seed_other_events(events: list[dict[str, Any]]) -> None:
    again = list(generate_events(CONFIG))
    assert len(again) == len(events)
    differ = [i for i, (a, b) in enumerate(zip(again, events, strict=True)) if a != b]
    assert not differ, f"{len(differ)} events differ, first at {differ[0]}"
    other = list(generate_events(GeneratorConfig(**{**CONFIG.__dict__, "seed": 8})))
    assert {e["txn_id"] for e in other}.isdisjoint({e["txn_id"] for e in events})


def test_every_approval_is_generated_once_with_unique_ids(
    events: list[dict[str, Any]], by_txn: dict[str, list[dict[str, Any]]]
) -> None:
    assert len(by_txn) == CONFIG.transactions
    for versions in by_txn.values():
        assert versions[0]["version"] == 1
        assert versions[0]["event_type"] == "payment.approved"
        assert [e["version"] for e in versions] == list(range(1, len(versions) + 1))
    assert len({e["order_id"] for e in events}) == CONFIG.transactions


def test_cancellations_keep_approved_at_and_raise_version_and_time(
    by_txn: dict[str, list[dict[str, Any]]],
) -> None:
    canceled = [v for v in by_txn.values() if len(v) > 1]
    # cancel_rate 0.3 of 4,000 payments; some are canceled twice.
    assert 1_000 < len(canceled) < 1_400
    assert any(len(v) == 3 for v in canceled)
    for versions in canceled:
        first = versions[0]
        for before, after in pairwise(versions):
            assert after["approved_at"] == first["approved_at"]
            assert after["version"] == before["version"] + 1
            assert _time(after["occurred_at"]) > _time(before["occurred_at"])
            assert after["canceled_amount"] > before["canceled_amount"]
            for field in ("merchant_id", "amount", "currency", "method", "order_id"):
                assert after[field] == first[field]
        delay = _time(versions[1]["occurred_at"]) - _time(first["approved_at"])
        assert timedelta(hours=1) <= delay <= timedelta(days=28)
    delays = sorted(
        _time(v[1]["occurred_at"]) - _time(v[0]["approved_at"]) for v in canceled
    )  # hours to weeks
    assert delays[len(delays) // 2] < timedelta(days=3)
    assert delays[-1] > timedelta(days=7)


def test_duplicates_share_event_id_and_payload(events: list[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for e in events:
        if e["event_id"] in seen:
            duplicates += 1
            assert e == seen[e["event_id"]]
        seen[e["event_id"]] = e
    distinct = len(seen)
    assert 0.03 * distinct < duplicates < 0.07 * distinct
    # Distinct events have distinct ids: one per (txn, version).
    assert len({(e["txn_id"], e["version"]) for e in seen.values()}) == distinct


def test_some_later_versions_are_emitted_before_earlier_ones(
    events: list[dict[str, Any]],
) -> None:
    def reordered(stream: list[dict[str, Any]]) -> int:
        highest: dict[str, int] = {}
        count = 0
        for e in stream:
            if e["version"] < highest.get(e["txn_id"], 0):
                count += 1
            highest[e["txn_id"]] = max(highest.get(e["txn_id"], 0), e["version"])
        return count

    assert reordered(events) > 100
    in_order = GeneratorConfig(**{**CONFIG.__dict__, "out_of_order_rate": 0.0})
    assert reordered(list(generate_events(in_order))) == 0


def test_amounts_are_integers_and_statuses_match_them(events: list[dict[str, Any]]) -> None:
    for e in events:
        amount, canceled = e["amount"], e["canceled_amount"]
        assert type(amount) is int and type(canceled) is int
        assert 0 <= canceled <= amount
        expected = "DONE" if canceled == 0 else "CANCELED" if canceled == amount else None
        assert e["status"] == (expected or "PARTIAL_CANCELED")
        assert e["event_type"] == EVENT_TYPE_OF_STATUS[e["status"]]
        if e["currency"] == "KRW":
            assert 1_000 <= amount <= 2_000_000 and amount % 100 == 0
            assert canceled % 100 == 0
        assert e["method"] in METHODS
        if e["method"] == "CARD":
            assert e["card_company"] in CARD_COMPANIES
            assert len(e["card_last4"]) == 4 and e["card_last4"].isdigit()
        else:
            assert e["card_company"] is None and e["card_last4"] is None
        assert _time(e["occurred_at"]) >= _time(e["approved_at"])


def test_distributions_look_like_payments(events: list[dict[str, Any]]) -> None:
    approvals = [e for e in events if e["version"] == 1]
    n = len(approvals)
    currencies = Counter(e["currency"] for e in approvals)
    assert currencies["KRW"] > 0.8 * n and currencies["USD"] + currencies["JPY"] > 0
    methods = Counter(e["method"] for e in approvals)
    assert methods["CARD"] > 0.45 * n and set(methods) == set(METHODS)
    merchants = Counter(e["merchant_id"] for e in approvals).most_common()
    assert merchants[0][1] > 5 * merchants[len(merchants) // 2][1]  # Zipf-like skew
    amounts = sorted(e["amount"] for e in approvals if e["currency"] == "KRW")
    assert amounts[len(amounts) // 2] < sum(amounts) / len(amounts)  # right-skewed
    names = [e["customer_name"] for e in approvals] + [e["order_name"] for e in approvals]
    hangul = sum(any("가" <= ch <= "힣" for ch in s) for s in names)
    assert 0.3 * len(names) < hangul < 0.95 * len(names)
    start = CONFIG.start.astimezone(UTC)
    assert all(
        start <= _time(e["approved_at"]) < start + timedelta(days=CONFIG.days) for e in approvals
    )


def test_arrow_path_matches_the_wire_path(
    events: list[dict[str, Any]], payments_spec: DatasourceSpec
) -> None:
    tables = list(generate_tables(CONFIG, batch_rows=1_000))
    assert all(t.schema == arrow_schema(payments_spec) for t in tables)
    assert [t.num_rows for t in tables[:-1]] == [1_000] * (len(tables) - 1)
    rows = pa.concat_tables(tables).to_pylist()
    assert len(rows) == len(events)
    for row, event in zip(rows, events, strict=True):
        for name in ("occurred_at", "approved_at"):
            assert row[name] == _time(event[name])
            row[name] = event[name]
        assert row == event


def test_approval_tables_are_new_keys_in_time_order(payments_spec: DatasourceSpec) -> None:
    tables = list(approval_tables(CONFIG, batch_rows=1_500))
    table = pa.concat_tables(tables)
    assert table.num_rows == CONFIG.transactions
    assert set(table.column("version").to_pylist()) == {1}
    assert len(set(table.column("txn_id").to_pylist())) == CONFIG.transactions
    times = table.column("approved_at").to_pylist()
    assert times == sorted(times)
    more = GeneratorConfig(**{**CONFIG.__dict__, "first_seq": CONFIG.transactions, "days": 1})
    later = pa.concat_tables(list(approval_tables(more)))
    assert set(later.column("txn_id").to_pylist()).isdisjoint(table.column("txn_id").to_pylist())


def test_cancellations_for_continue_the_stored_state() -> None:
    current = pa.concat_tables(list(approval_tables(CONFIG, batch_rows=500)))[:300]
    at = datetime(2026, 3, 1, tzinfo=UTC)
    first = cancellations_for(current, at, seed=1)
    assert first.num_rows == 300
    second = cancellations_for(first, at + timedelta(hours=2), seed=2)
    assert (
        second.num_rows
        == first.filter(pa.compute.equal(first["status"], "PARTIAL_CANCELED")).num_rows
    )
    for before, after in ((current, first), (first, second)):
        old = {r["txn_id"]: r for r in before.to_pylist()}
        for row in after.to_pylist():
            prev = old[row["txn_id"]]
            assert row["approved_at"] == prev["approved_at"]
            assert row["version"] == prev["version"] + 1
            assert row["event_id"] != prev["event_id"]
            assert prev["canceled_amount"] < row["canceled_amount"] <= row["amount"]
            assert row["status"] in ("PARTIAL_CANCELED", "CANCELED")
            assert (row["status"] == "CANCELED") == (row["canceled_amount"] == row["amount"])
    assert len({r["event_id"] for r in first.to_pylist()}) == first.num_rows


def test_the_store_ends_in_the_latest_state_of_every_payment(
    store: EmbeddedStore, reader: OlapReader, payments_spec: DatasourceSpec
) -> None:
    config = GeneratorConfig(**{**CONFIG.__dict__, "transactions": 1_500})
    wire = list(generate_events(config))
    for table in generate_tables(config, batch_rows=700):
        store.commit("payments", table, now=datetime(2026, 3, 1, tzinfo=UTC))
    latest = latest_by_key(payments_spec, wire)
    stored = reader.query(
        "SELECT txn_id, version, status, canceled_amount FROM payments ORDER BY txn_id"
    ).rows
    expected = sorted(
        [k, r["version"], r["status"], r["canceled_amount"]] for k, r in latest.items()
    )
    assert stored == expected

"""Decoding and validation: every kind of bad input becomes a dead letter with a
one-line reason naming what is wrong; good events become typed rows (aware UTC times,
integer money); and the synthetic malformed stream is rejected exactly where it is bad."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import Decoded, Decoder, Message
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import KINDS, Wire, corrupt, with_malformed
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths

TOPIC = "payments.v1"
KEY = b"txn_0001"


@cache
def spec() -> DatasourceSpec:
    return SpecRegistry.load(builtin_spec_paths()).get("payments")


@cache
def decoder() -> Decoder:
    return Decoder(spec())


def event(**changes: Any) -> dict[str, Any]:
    """A valid payment event in wire form, with ``changes`` applied."""
    base: dict[str, Any] = {
        "event_id": "evt_0001",
        "event_type": "payment.approved",
        "occurred_at": "2026-01-01T09:00:05+09:00",
        "txn_id": KEY.decode(),
        "version": 1,
        "merchant_id": "mch_00001",
        "order_id": "ord_0001",
        "order_name": "아메리카노 외 1건",
        "customer_name": "김민준",
        "method": "CARD",
        "card_company": "SHINHAN",
        "card_last4": "4242",
        "currency": "KRW",
        "amount": 9_000,
        "canceled_amount": 0,
        "status": "DONE",
        "approved_at": "2026-01-01T09:00:00.123+09:00",
    }
    base.update(changes)
    return base


def without(name: str) -> dict[str, Any]:
    ev = event()
    del ev[name]
    return ev


def decode(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None) -> Decoded:
    keys = keys if keys is not None else [KEY] * len(values)
    return decoder().decode(
        Message(TOPIC, 0, i, k, v, 1_700_000_000_000 + i)
        for i, (k, v) in enumerate(zip(keys, values, strict=True))
    )


def reject_reason(value: bytes | None, key: bytes | None = KEY) -> str:
    decoded = decode([value], [key])
    assert decoded.table.num_rows == 0, f"accepted {value!r}"
    assert len(decoded.rejected) == 1
    reason = decoded.rejected[0].reason
    assert reason.strip() and "\n" not in reason and "\r" not in reason, reason
    return reason


def mentions_word(reason: str, text: str) -> bool:
    """``text`` appears in ``reason`` as a whole word (``amount`` is not in ``canceled_amount``)."""
    return re.search(rf"(?<![\w]){re.escape(text)}(?![\w])", reason) is not None


def required_columns() -> list[str]:
    return [name for name, col in spec().columns.items() if not col.nullable]


# --- one kind of bad input at a time ---------------------------------------------------

CASES: list[tuple[str, bytes | None, bytes | None, tuple[str, ...]]] = [
    # id, value, key, what the reason must mention
    ("broken_json", orjson.dumps(event())[:57], KEY, ("JSON",)),
    ("empty_value", b"", KEY, ("JSON",)),
    ("tombstone", None, KEY, ()),
    ("not_utf8", b'{"txn_id": "\xff\xfe"}', KEY, ()),
    ("json_array", b"[1, 2, 3]", KEY, ("object",)),
    ("json_string", b'"payment"', KEY, ("object",)),
    ("json_number", b"42", KEY, ("object",)),
    ("json_null", b"null", KEY, ("object",)),
    ("float_amount", orjson.dumps(event(amount=9000.5)), KEY, ("amount", "int")),
    ("integral_float_amount", orjson.dumps(event(amount=9000.0)), KEY, ("amount", "int")),
    ("exponent_amount", orjson.dumps(event()).replace(b"9000", b"9e3"), KEY, ("amount",)),
    ("float_canceled", orjson.dumps(event(canceled_amount=0.5)), KEY, ("canceled_amount",)),
    ("bool_amount", orjson.dumps(event(amount=True)), KEY, ("amount", "bool")),
    ("bool_version", orjson.dumps(event(version=True)), KEY, ("version",)),
    ("string_amount", orjson.dumps(event(amount="9000")), KEY, ("amount",)),
    ("string_version", orjson.dumps(event(version="2")), KEY, ("version",)),
    ("int_merchant", orjson.dumps(event(merchant_id=17)), KEY, ("merchant_id",)),
    ("object_order_name", orjson.dumps(event(order_name={"a": 1})), KEY, ("order_name",)),
    ("epoch_time", orjson.dumps(event(approved_at=1767225600)), KEY, ("approved_at",)),
    ("too_big_amount", orjson.dumps(event(amount=2**63)), KEY, ("amount",)),
    ("huge_amount", orjson.dumps(event()).replace(b"9000", b"18446744073709551616"), KEY,
     ("amount",)),
    ("unknown_event_type", orjson.dumps(event(event_type="payment.refunded")), KEY,
     ("event_type", "payment.refunded")),
    ("event_type_case", orjson.dumps(event(event_type="payment.APPROVED")), KEY,
     ("event_type", "payment.APPROVED")),
    ("naive_approved_at", orjson.dumps(event(approved_at="2026-01-01T09:00:00")), KEY,
     ("approved_at",)),
    ("naive_occurred_at", orjson.dumps(event(occurred_at="2026-01-01T09:00:05.5")), KEY,
     ("occurred_at",)),
    ("date_only_time", orjson.dumps(event(approved_at="2026-01-01")), KEY, ("approved_at",)),
    ("not_a_time", orjson.dumps(event(approved_at="yesterday")), KEY, ("approved_at",)),
    ("key_mismatch", orjson.dumps(event()), b"txn_9999", ("txn_id", "txn_9999", "txn_0001")),
    ("null_merchant", orjson.dumps(event(merchant_id=None)), KEY, ("merchant_id", "null")),
    ("null_amount", orjson.dumps(event(amount=None)), KEY, ("amount", "null")),
    ("null_approved_at", orjson.dumps(event(approved_at=None)), KEY, ("approved_at", "null")),
    ("method_enum", orjson.dumps(event(method="CASH")), KEY, ("method", "CASH")),
    ("method_case", orjson.dumps(event(method="card")), KEY, ("method",)),
    ("status_enum", orjson.dumps(event(status="REFUNDED")), KEY, ("status", "REFUNDED")),
    ("currency_pattern", orjson.dumps(event(currency="krw")), KEY, ("currency",)),
    ("version_zero", orjson.dumps(event(version=0)), KEY, ("version",)),  # versions start at 1
    ("negative_version", orjson.dumps(event(version=-3)), KEY, ("version",)),
    ("negative_amount", orjson.dumps(event(amount=-1)), KEY, ("amount",)),
    ("negative_canceled", orjson.dumps(event(canceled_amount=-500)), KEY, ("canceled_amount",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "key", "mentions"),
    [pytest.param(v, k, m, id=i) for i, v, k, m in CASES],
)
def test_each_kind_of_bad_input_is_rejected_with_a_one_line_reason(
    value: bytes | None, key: bytes | None, mentions: tuple[str, ...]
) -> None:
    reason = reject_reason(value, key)
    for text in mentions:
        # A field by its name as a whole word; anything else (a value, a hint) as text.
        found = mentions_word(reason, text) if text in spec().columns else text in reason
        assert found, f"{reason!r} does not mention {text!r}"


@pytest.mark.parametrize("name", required_columns())
def test_a_missing_required_field_is_named(name: str) -> None:
    reason = reject_reason(orjson.dumps(without(name)))
    assert mentions_word(reason, name) and "missing" in reason.lower(), reason


@pytest.mark.parametrize("name", required_columns())
def test_null_in_a_non_nullable_field_is_named(name: str) -> None:
    reason = reject_reason(orjson.dumps(event(**{name: None})))
    assert mentions_word(reason, name) and "null" in reason.lower(), reason


def test_nullable_fields_may_be_null_or_absent() -> None:
    nullable = [n for n, c in spec().columns.items() if c.nullable]
    assert set(nullable) == {"card_company", "card_last4"}
    null_values = orjson.dumps(event(method="TRANSFER", card_company=None, card_last4=None))
    absent = event(method="TRANSFER")
    for name in nullable:
        del absent[name]
    decoded = decode([null_values, orjson.dumps(absent)])
    assert not decoded.rejected
    rows = decoded.table.to_pylist()
    assert [(r["card_company"], r["card_last4"]) for r in rows] == [(None, None)] * 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_every_corruption_the_generator_makes_is_rejected(kind: str, seed: int) -> None:
    original = event()
    value = corrupt(original, kind, random.Random(seed))
    reason = reject_reason(value)
    if kind == "broken_json":
        assert "JSON" in reason, reason
    else:
        assert mentions_word(reason, _changed_field(original, orjson.loads(value))), reason


@given(
    value=st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.booleans(),
        st.lists(st.integers(-(2**31), 2**31), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(-(2**31), 2**31), max_size=2),
    )
)
def test_money_is_only_ever_an_integer(value: Any) -> None:
    for field in ("amount", "canceled_amount"):
        reason = reject_reason(orjson.dumps(event(**{field: value})))
        assert mentions_word(reason, field), reason


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_every_non_negative_64_bit_amount_is_kept_exactly(amount: int) -> None:
    decoded = decode([orjson.dumps(event(amount=amount, canceled_amount=amount))])
    assert not decoded.rejected
    row = decoded.table.to_pylist()[0]
    assert type(row["amount"]) is int and row["amount"] == amount
    assert row["canceled_amount"] == amount


@given(st.binary(max_size=64), st.one_of(st.none(), st.binary(max_size=12)))
def test_arbitrary_bytes_never_raise(value: bytes, key: bytes | None) -> None:
    decoded = decode([value], [key])
    assert decoded.table.num_rows + len(decoded.rejected) == 1
    for r in decoded.rejected:
        assert "\n" not in r.reason


@given(st.data())
def test_a_corrupted_byte_anywhere_never_raises(data: st.DataObject) -> None:
    value = bytearray(orjson.dumps(event()))
    for _ in range(data.draw(st.integers(1, 3))):
        value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(value)))
    decoded = decode([bytes(value[:cut])])
    assert decoded.table.num_rows + len(decoded.rejected) == 1
    for r in decoded.rejected:
        assert r.reason.strip() and "\n" not in r.reason


# --- good events ---------------------------------------------------------------------


def test_a_good_event_decodes_to_aware_utc_times_and_integer_money() -> None:
    big = 2**53 + 1  # not representable as a float: proves money never went through one
    decoded = decode([orjson.dumps(event(amount=big, canceled_amount=big - 1))])
    assert not decoded.rejected
    schema = decoded.table.schema
    for name in ("approved_at", "occurred_at"):
        assert schema.field(name).type == pa.timestamp("us", tz="UTC")
    for name in ("amount", "canceled_amount", "version"):
        assert schema.field(name).type == pa.int64()
    row = decoded.table.to_pylist()[0]
    approved = row["approved_at"]
    assert isinstance(approved, datetime)
    assert approved.utcoffset() == timedelta(0)
    assert approved == datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    assert row["occurred_at"] == datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert row["amount"] == big and row["canceled_amount"] == big - 1
    assert type(row["amount"]) is int
    assert row["txn_id"] == "txn_0001" and row["order_name"] == "아메리카노 외 1건"
    assert decoded.partitions == [0]
    assert decoded.newest_produce_ms == 1_700_000_000_000


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01T00:00:00.123Z",
        "2026-01-01T00:00:00.123+00:00",
        "2026-01-01T09:00:00.123+09:00",
        "2025-12-31T19:00:00.123-05:00",
    ],
)
def test_every_offset_spelling_means_the_same_instant(text: str) -> None:
    decoded = decode([orjson.dumps(event(approved_at=text))])
    assert not decoded.rejected
    assert decoded.table.column("approved_at").to_pylist() == [
        datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    ]


def test_one_bad_message_does_not_hold_back_its_neighbours() -> None:
    values = [
        orjson.dumps(event(txn_id="txn_a")),
        b"{oops",
        orjson.dumps(event(txn_id="txn_b", amount=1.5)),
        orjson.dumps(event(txn_id="txn_c")),
    ]
    keys = [b"txn_a", b"txn_x", b"txn_b", b"txn_c"]
    decoded = decode(values, keys)
    assert decoded.table.column("txn_id").to_pylist() == ["txn_a", "txn_c"]
    assert [r.message.offset for r in decoded.rejected] == [1, 2]
    assert [r.message.key for r in decoded.rejected] == [b"txn_x", b"txn_b"]
    assert decoded.rejected[0].message.value == b"{oops"


# --- the synthetic stream ------------------------------------------------------------


def _stream(transactions: int, rate: float, seed: int) -> list[Wire]:
    config = GeneratorConfig(
        transactions=transactions,
        merchants=4,
        days=2,
        seed=seed,
        cancel_rate=0.3,
        duplicate_rate=0.1,
        out_of_order_rate=0.2,
    )
    return list(with_malformed(generate_events(config), rate, seed))


def _changed_field(original: dict[str, Any], bad: dict[str, Any]) -> str:
    changed = [k for k in original if k not in bad or bad[k] != original[k]]
    assert len(changed) == 1, changed
    return changed[0]


def _wire_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    transactions=st.integers(min_value=0, max_value=30),
    rate=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_the_decoder_rejects_exactly_the_malformed_wires(
    transactions: int, rate: float, seed: int
) -> None:
    wires = _stream(transactions, rate, seed)
    decoded = decoder().decode(
        Message(TOPIC, i % 3, i, w.key, w.value) for i, w in enumerate(wires)
    )
    bad = {i for i, w in enumerate(wires) if w.malformed is not None}
    assert {r.message.offset for r in decoded.rejected} == bad
    assert len(decoded.rejected) == len(bad)  # each once
    good = [orjson.loads(w.value) for w in wires if w.malformed is None]
    rows = decoded.table.to_pylist()
    assert len(rows) == len(good)
    for row, ev in zip(rows, good, strict=True):
        want = dict(ev)
        for f in ("approved_at", "occurred_at"):
            want[f] = _wire_time(ev[f])
        assert row == want
    for r in decoded.rejected:
        i = r.message.offset
        kind = wires[i].malformed
        assert "\n" not in r.reason
        assert r.message.key == wires[i].key and r.message.value == wires[i].value
        if kind == "broken_json":
            assert "JSON" in r.reason, r.reason
            continue
        # The malformed variant follows the good event it was made from.
        original = orjson.loads(wires[i - 1].value)
        assert wires[i - 1].malformed is None
        field = _changed_field(original, orjson.loads(wires[i].value))
        assert mentions_word(r.reason, field), r.reason


@pytest.mark.parametrize(("transactions", "days"), [(0, 1), (1, 2), (4, 5)])
def test_fewer_transactions_than_days_still_generates(transactions: int, days: int) -> None:
    config = GeneratorConfig(transactions=transactions, merchants=3, days=days, seed=1)
    events = list(generate_events(config))
    assert len({e["txn_id"] for e in events}) == transactions


def test_a_long_stream_carries_every_kind_and_same_seed_gives_the_same_wires() -> None:
    first = _stream(150, 0.3, 42)
    again = _stream(150, 0.3, 42)
    assert first == again
    assert {w.malformed for w in first} == {None, *KINDS}
    other = _stream(150, 0.3, 43)
    assert other != first
    # The good events do not depend on the malformed rate; only extra wires are added.
    clean = _stream(150, 0.0, 42)
    assert [w for w in first if w.malformed is None] == clean
    assert all(w.malformed is None for w in clean)


def test_each_malformed_wire_keeps_its_entity_key() -> None:
    wires = _stream(80, 0.5, 9)
    bad = [w for w in wires if w.malformed is not None]
    assert bad
    decoded = decoder().decode(Message(TOPIC, 0, i, w.key, w.value) for i, w in enumerate(bad))
    assert len(decoded.rejected) == len(bad)
    assert all(r.message.key is not None for r in decoded.rejected)
    good_keys = {orjson.loads(w.value)["txn_id"].encode() for w in wires if w.malformed is None}
    assert {w.key for w in bad} <= good_keys

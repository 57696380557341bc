"""Dead letters through the CLI: bad input goes to the dead-letter topic once, with the
reason and where it came from; it can be listed, and replayed once its cause is fixed."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.deadletter import list_dead_letters, raw_value
from ingest.decode import Decoder, Message
from ingest.sinks import OlapSink
from producers.malformed import Wire
from producers.publish import Publisher
from storage import OffsetRange, open_store
from tally.errors import BrokerUnavailable
from tally.settings import Settings
from tally.specs import SpecRegistry, builtin_spec_paths
from tests.brokers import Broker
from tests.cli import tally
from tests.ingest.conftest import env_for
from tests.ingest.test_cli_ingest import Consumed, consume_exactly, ok_json, stored_latest
from tests.ingest.test_decode import mentions_word

pytestmark = pytest.mark.slow


def event(txn: str, version: int = 1, **changes: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_id": f"evt_{txn}_{version}",
        "event_type": "payment.approved" if version == 1 else "payment.canceled",
        "occurred_at": f"2026-01-0{version}T10:00:00+09:00",
        "txn_id": txn,
        "version": version,
        "merchant_id": "mch_00007",
        "order_id": f"ord_{txn}",
        "order_name": "제주 감귤 5kg",
        "customer_name": "Grace Park",
        "method": "EASY_PAY",
        "card_company": None,
        "card_last4": None,
        "currency": "KRW",
        "amount": 32_000,
        "canceled_amount": 0 if version == 1 else 32_000,
        "status": "DONE" if version == 1 else "CANCELED",
        "approved_at": "2026-01-01T10:00:00+09:00",
    }
    ev.update(changes)
    return ev


def wire(ev: dict[str, Any], key: bytes | None = None) -> Wire:
    return Wire(key if key is not None else ev["txn_id"].encode(), orjson.dumps(ev), None)


def publish(settings: Settings, wires: list[Wire]) -> list[Consumed]:
    """Publish as a domain team would, then read the topic back: the source messages."""
    topic = settings.topic("payments.v1")
    assert Publisher(settings, topic).send(wires) == len(wires)
    return consume_exactly(settings, topic, len(wires))


def ingest(env: dict[str, str], sink: str = "olap") -> dict[str, Any]:
    report = ok_json(
        tally("ingest", "--sink", sink, "--until-idle", "3", "--format", "json", env=env)
    )
    sinks = {s["sink"]: s for s in report["sinks"]}
    assert all(s["error"] is None for s in sinks.values()), sinks
    return sinks


def dead_letters(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    listed = ok_json(tally("dlq", "list", "--format", "json", *args, env=env))
    assert set(listed) == {"dead_letters"}
    letters = listed["dead_letters"]
    assert isinstance(letters, list)
    return letters


def without(ev: dict[str, Any], name: str) -> dict[str, Any]:
    out = dict(ev)
    del out[name]
    return out


def test_malformed_messages_are_dead_lettered_once_and_good_ones_stored(
    topics: Settings,
) -> None:
    settings = topics
    env = env_for(settings)
    source_topic = settings.topic("payments.v1")

    good: list[Wire] = []
    expected: dict[str, tuple[int, str]] = {}
    for i in range(30):
        txn = f"txn_good{i:02d}"
        good.append(wire(event(txn)))
        expected[txn] = (1, f"evt_{txn}_1")
        if i % 3 == 0:  # a later cancellation of some of them
            good.append(wire(event(txn, 2)))
            expected[txn] = (2, f"evt_{txn}_2")

    latin1 = orjson.dumps(event("txn_bad13")).replace("제".encode(), b"\xe9")
    # (the bad message, what its reason must mention)
    bad: list[tuple[Wire, str | None]] = [
        (Wire(b"txn_bad01", orjson.dumps(event("txn_bad01"))[:50], "broken"), "JSON"),
        (wire(without(event("txn_bad02"), "amount")), "amount"),
        (wire(event("txn_bad03", amount=32_000.5)), "amount"),
        (wire({**event("txn_bad04"), "version": True}), "version"),
        (wire(event("txn_bad05", event_type="chargeback")), "event_type"),
        (wire(event("txn_bad06", approved_at="2026-01-01T10:00:00")), "approved_at"),
        (wire(event("txn_bad07"), key=b"txn_elsewhere"), "txn_id"),
        (Wire(b"txn_bad08", b'["txn_bad08"]', "array"), "object"),
        (wire(event("txn_bad09", merchant_id=None)), "merchant_id"),
        (wire(event("txn_bad10", method="CASH")), "method"),
        (wire(event("txn_bad11", amount=-100)), "amount"),
        # Truncated inside a Hangul character: not even UTF-8.
        (Wire(b"txn_bad12", b'{"txn_id": "txn_bad12", "order_name": "\xea\xb0', "bytes"), "JSON"),
        # Complete JSON, but a string in it is not UTF-8 (a Latin-1 producer).
        (Wire(b"txn_bad13", latin1, "latin1"), None),
    ]
    wires = list(good)
    for j, (b, _) in enumerate(bad):  # spread among the good ones
        wires.insert(1 + 4 * j, b)
    assert len(wires) == len(good) + len(bad)
    source = publish(settings, wires)
    at = {(m.partition, m.offset): m for m in source}
    mention = {b.value: text for b, text in bad}
    bad_positions = {(m.partition, m.offset) for m in source if m.value in mention}
    assert len(bad_positions) == len(bad)

    sinks = ingest(env, "all")  # both sinks: dead letters belong to the OLAP sink alone
    for s in sinks.values():
        assert (s["consumed"], s["rejected"]) == (len(wires), len(bad)), s

    letters = dead_letters(env)
    assert len(letters) == len(bad), [d.get("reason") for d in letters]
    positions = [(d["partition"], d["offset"]) for d in letters]
    assert len(set(positions)) == len(positions), "a message was dead-lettered twice"
    assert set(positions) == bad_positions
    assert len({d["id"] for d in letters}) == len(letters)
    for d in letters:
        original = at[(d["partition"], d["offset"])]
        assert raw_value(d) == original.value
        assert d["key"] == (original.key or b"").decode()
        assert d["sink"] == "olap" and d["datasource"] == "payments"
        assert d["topic"] == source_topic
        reason = d["reason"]
        assert isinstance(reason, str) and reason.strip() and "\n" not in reason
        want = mention[original.value or b""]
        assert want is None or mentions_word(reason, want), reason
    assert any("value_base64" in d for d in letters)  # the non-UTF-8 one survives intact

    # On the wire the same facts are Kafka headers of the dead-letter topic.
    raw = consume_exactly(settings, settings.topic("payments.v1.dlq"), len(bad))
    for m in raw:
        h = m.headers
        assert {"tally.reason", "tally.sink", "tally.topic", "tally.partition", "tally.offset"} <= (
            h.keys()
        )
        assert h["tally.sink"] == b"olap" and h["tally.topic"] == source_topic.encode()
        original = at[(int(h["tally.partition"]), int(h["tally.offset"]))]
        assert (m.key, m.value) == (original.key, original.value)

    assert len(dead_letters(env, "--limit", "2")) == 2
    assert stored_latest(env) == expected


def _fixed_spec(tmp_path: Path) -> Path:
    """The shipped payments spec, with payment.refunded accepted (the cause is fixed)."""
    shipped = next(p for p in builtin_spec_paths() if Path(p).name == "payments.toml")
    text = Path(shipped).read_text(encoding="utf-8")
    old = 'event_types = ["payment.approved", "payment.canceled", "payment.partially_canceled"]'
    assert old in text
    fixed = tmp_path / "payments.toml"
    fixed.write_text(
        text.replace(old, old[:-1] + ', "payment.refunded"]'),
        encoding="utf-8",
    )
    return fixed


def test_dead_letters_replay_once_after_the_cause_is_fixed(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    env = env_for(settings)
    good = {f"txn_ok{i:02d}": event(f"txn_ok{i:02d}") for i in range(15)}
    refunded = {
        f"txn_rf{i:02d}": event(
            f"txn_rf{i:02d}",
            2,
            event_type="payment.refunded",
            event_id=f"evt_txn_rf{i:02d}_refund",
        )
        for i in range(4)
    }
    wires = [wire(ev) for ev in [*good.values(), *refunded.values()]]
    publish(settings, wires)

    first = ingest(env)["olap"]
    assert (first["consumed"], first["rejected"]) == (len(wires), len(refunded))
    letters = dead_letters(env)
    assert sorted(d["key"] for d in letters) == sorted(refunded)
    assert all("payment.refunded" in d["reason"] for d in letters)
    want = {k: (ev["version"], ev["event_id"]) for k, ev in good.items()}
    assert stored_latest(env) == want

    fixed = {**env, "TALLY_SPECS": json.dumps([str(_fixed_spec(tmp_path))])}
    assert ok_json(tally("dlq", "replay", "--format", "json", env=fixed)) == {
        "replayed": len(refunded)
    }
    second = ingest(fixed)["olap"]
    # Only the republished messages: ingestion resumes where the store is.
    assert (second["consumed"], second["rejected"], second["written"]) == (len(refunded), 0, 4)
    want |= {k: (ev["version"], ev["event_id"]) for k, ev in refunded.items()}
    assert stored_latest(fixed) == want
    rows = ok_json(
        tally(
            "sql",
            "SELECT txn_id FROM payments WHERE event_type = 'payment.refunded' ORDER BY txn_id",
            "--format",
            "json",
            env=fixed,
        )
    )["rows"]
    assert [r[0] for r in rows] == sorted(refunded)

    # Replayed once each; the replayed messages did not fail again.
    assert ok_json(tally("dlq", "replay", "--format", "json", env=fixed)) == {"replayed": 0}
    assert len(dead_letters(fixed)) == len(refunded)


def test_processes_sharing_a_store_each_publish_only_their_own_dead_letters(
    topics: Settings, registry: SpecRegistry
) -> None:
    """Two ingest processes write one store, each its own partitions. If each published
    every pending letter, two could produce the same one at once, and both copies would
    land (a rolling restart showed it): each publishes those of its partitions only."""
    spec = registry.get("payments")
    topic = topics.topic(spec.datasource.topic)
    decoder = Decoder(spec)
    sinks = [OlapSink(topics, spec, open_store(topics, registry)) for _ in range(2)]
    try:
        for part, sink in enumerate(sinks):
            sink.start_positions([(topic, part)])
            bad = Message(topic, part, 0, b"txn_bad", b"{not json")
            sink.write(decoder.decode([bad]), {(topic, part): OffsetRange(0, 1)})
        # Both batches are committed, both letters pending: each sink publishes its own.
        assert [sink.after_write() for sink in sinks] == [1, 1]
    finally:
        for sink in sinks:
            sink.close()
    letters = list_dead_letters(topics, spec)
    assert sorted((d["partition"], d["offset"]) for d in letters) == [(0, 0), (1, 0)]


def test_a_letter_still_in_flight_when_a_flush_gives_up_is_not_produced_again(
    broker: Broker, topics: Settings, registry: SpecRegistry
) -> None:
    """The broker freezes while a letter is being published: the flush gives up, but
    the letter stays in the producer's queue and lands when the broker resumes. The
    retry must not produce it a second time (a 10 s freeze doubled four letters)."""
    spec = registry.get("payments")
    topic = topics.topic(spec.datasource.topic)
    sink = OlapSink(topics, spec, open_store(topics, registry))
    sink.publisher.flush_timeout_s = 1.0
    try:
        sink.start_positions([(topic, 0)])
        for offset in (0, 1):  # the first publish also looks for a predecessor's letters
            bad = Message(topic, 0, offset, b"txn_bad", b"{not json")
            sink.write(Decoder(spec).decode([bad]), {(topic, 0): OffsetRange(offset, offset + 1)})
            if offset == 0:
                assert sink.after_write() == 1
        broker.pause()
        try:
            with pytest.raises(BrokerUnavailable):
                sink.after_write()
        finally:
            broker.resume()
        for _ in range(30):  # each try waits up to its flush timeout for the answer
            with contextlib.suppress(BrokerUnavailable):
                sink.after_write()
                break
        assert sink.store.outbox.pending(spec.name) == []
    finally:
        sink.close()
    letters = list_dead_letters(topics, spec)
    assert [(d["partition"], d["offset"]) for d in letters] == [(0, 0), (0, 1)]

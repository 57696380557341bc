"""The relay's rows (no broker): flat, typed as the supervisor spec declares, and the
relay chosen by the store's capabilities, not by a backend's name."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from ingest.decode import Decoder, Message
from ingest.relay import KafkaRelay
from ingest.service import make_sink
from ingest.sinks import OlapSink
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import encode
from storage.refined import RowEncoder
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry


def test_rows_are_flat_json_with_epoch_millis_and_integer_money(
    payments_spec: DatasourceSpec,
) -> None:
    events = list(generate_events(GeneratorConfig(transactions=50, merchants=3, days=2, seed=1)))
    messages = [
        Message("payments.v1", i % 3, i, e["txn_id"].encode(), encode(e))
        for i, e in enumerate(events)
    ]
    decoded = Decoder(payments_spec).decode(messages)
    assert not decoded.rejected
    keys, values = RowEncoder(payments_spec).encode(decoded.table)
    assert len(values) == len(events) and decoded.offsets == list(range(len(events)))
    for key, value, event in zip(keys, values, events, strict=True):
        row = orjson.loads(value)
        assert set(row) == set(payments_spec.columns) and key == event["txn_id"].encode()
        approved = datetime.fromisoformat(event["approved_at"]).astimezone(UTC)
        assert row["approved_at"] == int(approved.timestamp() * 1000)
        assert isinstance(row["occurred_at"], int)
        assert row["amount"] == event["amount"] and isinstance(row["amount"], int)
        assert row["card_last4"] == event.get("card_last4")


def test_the_olap_sink_is_the_relay_where_the_engine_ingests_from_kafka(
    payments_spec: DatasourceSpec, registry: SpecRegistry, data_dir: Path
) -> None:
    druid = Settings(data_dir=data_dir, store=StoreSettings(backend="druid"))
    relay = make_sink(druid, payments_spec, "olap", registry)
    assert isinstance(relay, KafkaRelay) and relay.commits_offsets_itself
    assert relay.topic == "payments.v1.refined" and relay.name == "olap"
    embedded = make_sink(Settings(data_dir=data_dir), payments_spec, "olap", registry)
    try:
        assert isinstance(embedded, OlapSink) and not embedded.commits_offsets_itself
    finally:
        embedded.close()

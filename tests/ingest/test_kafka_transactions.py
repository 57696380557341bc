"""Transactional producers: what an aborted transaction held reaches neither sink nor
the dead-letter topic; what committed transactions held reaches both, exactly.

Only Apache Kafka can show it: the development broker hands aborted records to
read_committed consumers (it does not filter them), so this test runs on Kafka alone.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from ingest.kafka import base_config, ensure_topics
from producers.generate import GeneratorConfig, rfc3339
from producers.malformed import Wire, encode
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import build
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow


def _transaction(settings: Settings, topic: str, wires: list[Wire], *, commit: bool) -> None:
    producer = Producer(
        base_config(settings) | {"transactional.id": f"test-{uuid.uuid4().hex}", "linger.ms": 5}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for wire in wires:
        producer.produce(topic, key=wire.key, value=wire.value)
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def _wire(value: Any) -> Any:
    return rfc3339(value) if isinstance(value, datetime) else value


def _poisoned(good: list[dict[str, Any]]) -> list[Wire]:
    """What an aborted transaction carries: newer versions of committed payments (they
    would win the merge if they leaked), new payments, and a malformed message."""
    out = []
    for event in good[:300]:
        newer = {
            **event,
            "version": event["version"] + 10,
            "event_id": f"aborted-{event['txn_id']}",
        }
        newer |= {"status": "CANCELED", "canceled_amount": event["amount"]}
        out.append(newer)
    for i, event in enumerate(good[:100]):
        out.append({**event, "txn_id": f"aborted-{i}", "event_id": f"aborted-new-{i}"})
    wires = [
        Wire(e["txn_id"].encode(), encode({k: _wire(v) for k, v in e.items()}), None) for e in out
    ]
    return [*wires, Wire(b"x", b'{"aborted": ', "undecodable")]


def test_aborted_transactions_reach_no_sink_and_committed_ones_reach_both(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry, tmp_path: Path
) -> None:
    settings = broker_settings(kafka_broker, data_dir)
    ensure_topics(settings, registry)
    topic = settings.topic(registry.get("payments").datasource.topic)
    published = build(GeneratorConfig(transactions=3_000, merchants=10, days=5, seed=5), 0.01)
    half = len(published.wires) // 2
    _transaction(settings, topic, published.wires[:half], commit=True)
    _transaction(settings, topic, _poisoned(published.good), commit=False)
    _transaction(settings, topic, published.wires[half:], commit=True)

    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--sink", "all", "--until-idle", "3", log=log)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    consumed = {s["sink"]: s["consumed"] for s in orjson.loads(out)["sinks"]}
    assert consumed == {"olap": len(published.wires), "search": len(published.wires)}
    assert_exact(settings, registry, published)

"""``tally verify [--repair]`` on a real Druid fed by a real Kafka. Injected: a stale
base row (an event the relay never relayed), a bogus delta summed into a rollup, and,
straight into the topic Druid ingests, a version of a key newer than the log's and a
key the log never had. Verification finds all four; ``--repair`` fixes the stale row
through the relay's own write path (row, deltas and key state in one transaction), the
other two rows by reindexing their chunks, and the rollup by a corrective delta; a
third verification finds nothing.

What it does not prove: verification under live traffic (the relay is stopped here,
as ``--repair`` on Druid requires); a chunk too large to reindex inline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from ingest.kafka import base_config, ensure_topics
from producers.generate import GeneratorConfig, rfc3339
from producers.publish import Publisher
from storage.druid.reader import DruidReader
from storage.druid.supervisor import datasource_name, supervisors
from storage.refined import RowEncoder, encode_deltas, refined_topic, rollup_topic
from storage.schema import row_schema, rows_to_table
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.cli import tally
from tests.compaction.test_late_under_ingestion import _cancel
from tests.compaction.verifying import ingest_until_idle
from tests.compaction.verifying import verify_json as _verify
from tests.conftest import broker_settings
from tests.druid import Druid, poll
from tests.factories import latest_by_key
from tests.ingest.conftest import env_for
from tests.ingest.reference import build
from tests.storage.druid.conftest import druid_settings
from tests.storage.druid.test_e2e import rollup_groups, topic_ends

pytestmark = pytest.mark.slow


def _caught_up(reader: DruidReader, settings: Settings, registry: SpecRegistry) -> None:
    """Druid's supervisor says it has read the refined topic to its end (its status is
    refreshed every ``period``): what verification needs to count rows as ingested."""
    ends = topic_ends(settings, refined_topic(settings, registry.get("payments")))
    refined = refined_topic(settings, registry.get("payments"))

    def read_all() -> bool | None:
        at = reader.ingest_figures("payments").offsets
        return at == {(refined, p): e for p, e in ends.items()} or None

    poll(read_all, 120, "the supervisor's status never caught up")


def _what(diffs: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {(d["sink"], d["kind"], d.get("key") or d.get("rollup")) for d in diffs}


def _summed(reader: DruidReader, settings: Settings, registry: SpecRegistry) -> dict[str, int]:
    spec = registry.get("payments")
    return {
        r.name: sum(v[0] for v in rollup_groups(reader, spec, r).values()) for r in spec.rollups
    }


def test_verify_finds_stale_newer_ghost_rows_and_a_bogus_delta_on_druid_and_repairs_all(
    kafka_broker: KafkaBroker,
    druid: Druid,
    data_dir: Path,
    registry: SpecRegistry,
    request: pytest.FixtureRequest,
) -> None:
    spec = registry.get("payments")
    settings = druid_settings(druid, data_dir, broker_settings(kafka_broker, data_dir, 2))
    ensure_topics(settings, registry)
    config = GeneratorConfig(
        transactions=200, merchants=5, days=3, seed=5, cancel_rate=0.3, duplicate_rate=0.05
    )
    published = build(config, malformed_rate=0.02)
    topic = settings.topic(spec.datasource.topic)
    Publisher(settings, topic).send(published.wires)
    names = list(supervisors(settings, spec))
    request.addfinalizer(lambda: druid.drop(*names))
    assert tally("druid", "apply", "--format", "json", env=env_for(settings)).code == 0
    ingest_until_idle(settings, registry, ["olap", "search"])
    latest = latest_by_key(spec, published.good)
    base = datasource_name(settings, spec)
    reader = DruidReader(settings, registry)
    everything = {r.name: len(latest) for r in spec.rollups}
    poll(lambda: druid.count(base) == len(published.good) or None, 180, "rows not served")
    poll(lambda: _summed(reader, settings, registry) == everything or None, 180, "deltas")
    _caught_up(reader, settings, registry)

    code, clean = _verify(settings)
    assert code == 0 and clean["differences"] == [] and clean["lagging"] == {}, clean
    assert clean["keys_checked"] == len(latest)

    # A stale row: a cancellation the relay skips (its group moved past it), which
    # the search sink does see.
    once = sorted(k for k, r in latest.items() if r["version"] == 1 and r["status"] == "DONE")
    stale = _cancel(latest[once[0]])
    delivered: list[Any] = []
    prod = Producer(base_config(settings))
    value = orjson.dumps({k: rfc3339(v) if hasattr(v, "tzinfo") else v for k, v in stale.items()})
    prod.produce(
        topic,
        key=stale["txn_id"].encode(),
        value=value,
        on_delivery=lambda e, m: delivered.append(m),
    )
    prod.flush(30)
    (msg,) = delivered
    skip = Consumer(base_config(settings) | {"group.id": settings.group("olap", spec.name)})
    skip.commit(
        offsets=[TopicPartition(topic, msg.partition(), msg.offset() + 1)], asynchronous=False
    )
    skip.close()
    ingest_until_idle(settings, registry, ["search"])

    # Rows Druid holds and the log does not: a ghost key, and a version 99 of a key.
    other = sorted(k for k in latest if k != stale["txn_id"])[0]
    ghost = {**latest[other], "txn_id": "ghost-1", "event_id": "ghost-1-v1"}
    newer = {**latest[other], "version": 99, "event_id": f"{other}-v99", "amount": 1}
    table = rows_to_table([ghost, newer], row_schema(spec))
    keys, values = RowEncoder(spec).encode(table)
    refined = refined_topic(settings, spec)
    for key, row in zip(keys, values, strict=True):
        prod.produce(refined, key=key, value=row)
    prod.flush(30)
    poll(lambda: druid.count(base) == len(published.good) + 2 or None, 120, "ghosts not served")

    # A bogus delta in payments_daily, summed by Druid.
    daily = spec.rollup("payments_daily")
    groups = rollup_groups(reader, spec, daily)
    bucket, merchant, currency = sorted(groups)[0]
    bogus = pa.table(
        {
            "bucket": pa.array([bucket], pa.timestamp("us", tz="UTC")),
            "merchant_id": [merchant],
            "currency": [currency],
            **{m.name: pa.array([7], pa.int64()) for m in spec.parsed_metrics},
        }
    )
    (delta,) = encode_deltas(spec, daily, bogus)
    prod.produce(rollup_topic(settings, spec, daily), value=delta)
    prod.flush(30)
    bumped = {**everything, "payments_daily": len(latest) + 7}
    poll(lambda: _summed(reader, settings, registry) == bumped or None, 120, "bogus not summed")
    _caught_up(reader, settings, registry)

    code, found = _verify(settings)
    assert code == 1, found
    what = _what(found["differences"])
    assert ("olap", "stale", stale["txn_id"]) in what
    assert {("olap", "unexpected", "ghost-1"), ("olap", "unexpected", other)} <= what
    assert ("rollup", "corrupt", "payments_daily") in what  # the bogus delta (and the cancel)
    assert {d[0] for d in what} == {"olap", "rollup"}  # search saw the cancellation

    code, fixed = _verify(settings, "--repair")
    assert code == 0 and fixed["remaining"] == 0, fixed
    assert {(d["sink"], d["action"]) for d in fixed["repaired"]} >= {
        ("olap", "rewrote"),
        ("rollup", "rebuilt"),
    }
    code, again = _verify(settings)
    assert code == 0 and again["differences"] == [], again
    got = reader.lookup(spec.name, [stale["txn_id"], other, "ghost-1"]).to_pylist()
    assert {r["txn_id"]: (r["version"], r["amount"]) for r in got} == {
        stale["txn_id"]: (stale["version"], stale["amount"]),
        other: (latest[other]["version"], latest[other]["amount"]),
    }
    reader.close()

"""The Druid backend end to end, on a real Kafka and a real Druid: generated events
(duplicates, out-of-order versions, cancellations 30 days after their payments,
malformed messages) → ``tally ingest --sink olap`` (the relay) → ``tally druid apply``
(Druid's Kafka supervisor) → DruidReader answers exactly what the reference says.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlglot import exp

from ingest.deadletter import list_dead_letters, raw_value
from ingest.kafka import base_config, ensure_topics
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from rollups.request import AggregateRequest
from rollups.router import run
from storage.druid.overlord import Overlord
from storage.druid.reader import DruidReader
from storage.druid.supervisor import datasource_name, supervisors
from storage.refined import refined_topic
from storage.sql import col, subquery
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry
from tests.brokers import KafkaBroker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.druid import Druid, poll
from tests.factories import latest_by_key, normalise, reference_rollup
from tests.ingest.conftest import env_for, start_ingest
from tests.ingest.reference import Published, build
from tests.storage.druid.conftest import druid_settings

pytestmark = pytest.mark.slow

# Cancellations land 30 to 31 days after their payments: in Druid intervals that were
# closed long before (no lateMessageRejectionPeriod, so they are kept).
LATE = {"cancel_delay_min_h": 720.0, "cancel_delay_median_h": 724.0, "cancel_delay_max_h": 744.0}


def published_events() -> Published:
    config = GeneratorConfig(
        transactions=3_000,
        merchants=8,
        days=4,
        seed=12,
        cancel_rate=0.3,
        duplicate_rate=0.05,
        out_of_order_rate=0.2,
        **LATE,  # type: ignore[arg-type]
    )
    return build(config, malformed_rate=0.02)


def relay(settings: Settings, log: Path) -> dict[str, Any]:
    proc = start_ingest(settings, "--sink", "olap", "--until-idle", "4", log=log)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    report: dict[str, Any] = orjson.loads(out)["sinks"][0]
    return report


def topic_ends(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer(base_config(settings) | {"group.id": "ends", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
    finally:
        consumer.close()


def rollup_groups(
    reader: DruidReader, spec: DatasourceSpec, rollup: Rollup
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """(bucket, *dimensions) → summed metrics of the rollup's datasource, zero groups
    left out (a key that moved away nets to zero where it was)."""
    keys = [col("bucket"), *(col(d) for d in rollup.dimensions)]
    metrics = [exp.Sum(this=col(m.name)) for m in spec.parsed_metrics]
    query = (
        exp.select(*keys, *metrics)
        .from_(subquery(reader.relation(rollup.name), "r"))
        .group_by(*(exp.Literal.number(i + 1) for i in range(len(keys))))
    )
    out = {}
    for row in reader.query(query.sql(dialect=reader.capabilities.sql_dialect)).rows:
        values = tuple(int(v) for v in row[len(keys) :])
        if any(values):
            out[tuple(normalise(x) for x in row[: len(keys)])] = values
    return out


def recount(spec: DatasourceSpec, published: Published) -> dict[tuple[str, str], tuple[int, ...]]:
    """(merchant, status) → count, gross, canceled, from the reference merge."""
    out: dict[tuple[str, str], list[int]] = {}
    for row in latest_by_key(spec, published.good).values():
        sums = out.setdefault((row["merchant_id"], row["status"]), [0, 0, 0])
        sums[0] += 1
        sums[1] += row["amount"]
        sums[2] += row["canceled_amount"]
    return {k: tuple(v) for k, v in out.items()}


def test_events_through_the_relay_and_druids_supervisor_equal_the_reference(
    kafka_broker: KafkaBroker,
    druid: Druid,
    data_dir: Path,
    registry: SpecRegistry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    spec = registry.get("payments")
    settings = druid_settings(druid, data_dir, broker_settings(kafka_broker, data_dir))
    ensure_topics(settings, registry)
    published = published_events()
    latest = latest_by_key(spec, published.good)
    late = [r for r in latest.values() if r["occurred_at"] - r["approved_at"] >= timedelta(days=30)]
    assert late and published.malformed and len(published.good) > len(latest)
    Publisher(settings, settings.topic(spec.datasource.topic)).send(published.wires)

    report = relay(settings, tmp_path / "ingest.log")
    assert report["consumed"] == len(published.wires)
    assert report["rejected"] == sum(published.malformed.values())

    # The supervisor, applied twice: the second time it is already what Druid runs.
    env = env_for(settings)
    first = tally("druid", "apply", "--format", "json", env=env)
    assert first.code == 0, first.err
    name = datasource_name(settings, spec)
    names = list(supervisors(settings, spec))  # the base's, then each rollup's
    request.addfinalizer(lambda: druid.drop(*names))
    assert first.json() == {
        "supervisors": [{"supervisor": n, "result": "submitted"} for n in names]
    }
    again = tally("druid", "apply", "--format", "json", env=env)
    assert again.code == 0, again.err
    assert again.json() == {
        "supervisors": [{"supervisor": n, "result": "unchanged"} for n in names]
    }
    overlord = Overlord(settings)
    state = poll(
        lambda: s if (s := overlord.status(name)) and s.get("state") == "RUNNING" else None,
        120,
        "the supervisor is not RUNNING",
    )
    assert state["stream"] == refined_topic(settings, spec)

    # Caught up: every refined row is served (whatever Druid holds, merged on read).
    reader = DruidReader(settings, registry)
    started = time.monotonic()
    poll(lambda: druid.count(name) == len(published.good) or None, 300, "rows not all served")
    caught_up_s = time.monotonic() - started

    dialect = reader.capabilities.sql_dialect
    rel = subquery(reader.relation("payments"), "m")
    query = (
        exp.select(
            col("merchant_id"),
            col("status"),
            exp.Count(this=exp.Star()),
            exp.Sum(this=col("amount")),
            exp.Sum(this=col("canceled_amount")),
        )
        .from_(rel)
        .group_by(exp.Literal.number(1), exp.Literal.number(2))
    )
    t = time.monotonic()
    got = {(m, s): (n, g, c) for m, s, n, g, c in reader.query(query.sql(dialect=dialect)).rows}
    merge_s = time.monotonic() - t
    assert got == recount(spec, published)

    # Late cancellations are in their payments' (old) partitions, as the latest version.
    found = reader.lookup("payments", [r["txn_id"] for r in late[:50]]).to_pylist()
    assert {r["txn_id"]: (r["version"], r["status"]) for r in found} == {
        r["txn_id"]: (r["version"], r["status"]) for r in late[:50]
    }

    # Each rollup, once its supervisor has summed every delta, equals the reference.
    for rollup in spec.rollups:
        rel = subquery(reader.relation(rollup.name), "r")
        summed = exp.select(exp.Sum(this=col("count"))).from_(rel).sql(dialect=dialect)

        def all_summed(sql: str = summed) -> bool | None:
            return reader.query(sql).rows[0][0] == len(latest) or None

        poll(all_summed, 300, f"{rollup.name}: deltas not all summed")
        assert rollup_groups(reader, spec, rollup) == {
            tuple(normalise(x) for x in k): v
            for k, v in reference_rollup(spec, rollup.name, latest).items()
        }

    # Per-merchant daily sales through the router: from the daily rollup.
    # Seoul midnights: a day bucket the daily rollup holds whole.
    earliest = min(r["approved_at"] for r in latest.values()).astimezone(spec.tz)
    start = earliest.replace(hour=0, minute=0, second=0, microsecond=0)
    end = max(r["approved_at"] for r in latest.values()).astimezone(spec.tz).replace(
        hour=0, minute=0, second=0, microsecond=0
    ) + timedelta(days=1)
    merchant = next(iter(got))[0]
    routed, result = run(
        reader,
        spec,
        AggregateRequest(
            start=start, end=end, granularity="day", filters={"merchant_id": (merchant,)}
        ),
    )
    assert routed.source == "payments_daily"
    want = sum(v[0] for k, v in recount(spec, published).items() if k[0] == merchant)
    assert sum(r[result.columns.index("count")] for r in result.rows) == want
    buckets = [r[0] for r in result.rows]
    assert all(b.astimezone(spec.tz).hour == 0 for b in buckets)  # Seoul midnights

    assert reader.freshness("payments") == max(r["approved_at"] for r in published.good)

    # Every malformed message is a dead letter, once.
    letters = list_dead_letters(settings, spec)
    assert Counter(raw_value(d) or b"" for d in letters) == published.malformed

    # The supervisor's offsets reach the refined topic's ends.
    refined = refined_topic(settings, spec)
    ends = {(refined, p): e for p, e in topic_ends(settings, refined).items()}
    poll(
        lambda: reader.ingest_figures("payments").offsets == ends or None,
        120,
        f"supervisor offsets never reached {ends}",
    )
    print(
        f"\nDruid e2e: {len(published.wires)} messages, {len(published.good)} rows, "
        f"{len(latest)} keys; served {caught_up_s:.1f}s after apply; merged "
        f"per-merchant/status query {merge_s * 1000:.0f} ms; at {datetime.now():%H:%M}"
    )

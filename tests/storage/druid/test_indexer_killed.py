"""Druid's indexer SIGKILLed mid-task, on a real Kafka and a real Druid: the
supervisor's next task starts from the offsets in Druid's metadata, and the totals
are exact.

A first task hands off (publishes a segment and its end offsets), so the metadata
holds offsets past the start; the next task is killed with rows read and nothing of
them published; the relay goes on writing while the indexer is down. Merge on read
would hide a duplicate, so the raw row count is checked too: it equals the messages
in the refined topic, which only holds if Druid ingested none of them twice (its own
exactly-once: a task's segments and end offsets are one CAS in its metadata).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlglot import exp

from ingest.kafka import base_config, ensure_topics
from producers.publish import Publisher
from storage.druid.overlord import Overlord
from storage.druid.reader import DruidReader
from storage.druid.supervisor import datasource_name, supervisor_spec
from storage.refined import refined_topic
from storage.sql import col, subquery
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.druid import Druid, poll
from tests.storage.druid.conftest import druid_settings
from tests.storage.druid.test_e2e import published_events, recount, relay, topic_ends

pytestmark = pytest.mark.slow


def committed_messages(settings: Settings, topic: str) -> int:
    """Messages a read_committed consumer reads from ``topic`` (its end offsets also
    count the transactions' commit markers, so they are not a message count)."""
    ends = topic_ends(settings, topic)
    consumer = Consumer(
        base_config(settings)
        | {
            "group.id": "count",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    count, done = 0, {p for p, end in ends.items() if end == 0}
    try:
        while len(done) < len(ends):
            for msg in consumer.consume(500, timeout=1.0):
                if msg.error() is None:
                    count += 1
            for p, end in ends.items():
                position = consumer.position([TopicPartition(topic, p)])[0].offset
                if position >= end:
                    done.add(p)
    finally:
        consumer.close()
    return count


def test_the_indexer_sigkilled_mid_task_loses_and_doubles_nothing(
    kafka_broker: KafkaBroker,
    druid: Druid,
    data_dir: Path,
    registry: SpecRegistry,
    tmp_path: Path,
) -> None:
    spec = registry.get("payments")
    settings = druid_settings(druid, data_dir, broker_settings(kafka_broker, data_dir))
    ensure_topics(settings, registry)
    published = published_events()
    third = len(published.wires) // 3
    source = settings.topic(spec.datasource.topic)
    refined = refined_topic(settings, spec)
    name = datasource_name(settings, spec)
    overlord = Overlord(settings)
    reader = DruidReader(settings, registry)
    indexer = druid.engine.pid_files["indexer"]
    others = {r: druid.engine.role_running(r) for r in druid.engine.roles if r != "indexer"}
    try:
        overlord.apply(name, supervisor_spec(settings, spec))
        Publisher(settings, source).send(published.wires[:third])
        relay(settings, tmp_path / "relay-1.log")
        first = committed_messages(settings, refined)

        # The first task publishes what it read: offsets in Druid's metadata.
        poll(lambda: druid.count(name) == first or None, 180, f"{first} rows not served")
        assert druid.published_segments(name) == []
        druid.handoff(name)
        poll(lambda: druid.published_segments(name) or None, 180, "no segment published")

        # Mid-task: the next task serves rows it read, none of them published.
        Publisher(settings, source).send(published.wires[third : 2 * third])
        relay(settings, tmp_path / "relay-2.log")
        published_before = druid.published_segments(name)
        served = poll(
            lambda: n if (n := druid.count(name) or 0) > first else None,
            180,
            "the next task read nothing",
        )
        assert druid.published_segments(name) == published_before
        record = indexer.running()
        assert record is not None
        os.kill(record.pid, signal.SIGKILL)
        poll(lambda: indexer.running() is None or None, 30, "the indexer outlived SIGKILL")

        # Ingestion goes on meanwhile: the relay writes the rest to the refined topic.
        Publisher(settings, source).send(published.wires[2 * third :])
        relay(settings, tmp_path / "relay-3.log")

        up = tally("engines", "up", "druid", data_dir=druid.data_dir, timeout=300)
        assert up.code == 0, up.err
        assert indexer.running() is not None
        restarted = time.monotonic()
        # Restarted alone: every other role is the process it was.
        assert {r: druid.engine.role_running(r) for r in others} == others
    finally:
        if indexer.running() is None:
            druid.engine.up()  # the session's Druid serves the tests after this one

    try:
        messages = committed_messages(settings, refined)
        assert messages == len(published.good)
        ends = {(refined, p): e for p, e in topic_ends(settings, refined).items()}
        poll(
            lambda: reader.ingest_figures("payments").offsets == ends or None,
            300,
            f"the supervisor's offsets never reached {ends}",
        )
        poll(lambda: druid.count(name) == messages or None, 120, "rows not all served")
        recovered_s = time.monotonic() - restarted
        # Read to the end of the topic: the raw count is the topic's, not more.
        assert druid.count(name) == messages

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
        rows = reader.query(query.sql(dialect=reader.capabilities.sql_dialect)).rows
        assert {(m, s): (n, g, c) for m, s, n, g, c in rows} == recount(spec, published)
        print(
            f"\nindexer SIGKILLed with {served} rows served ({first} published by the first"
            f" task); {messages} refined messages, all served {recovered_s:.1f}s after"
            " `tally engines up druid` returned"
        )
    finally:
        druid.drop(name)

"""``tally engines`` with a real Apache Kafka: shape of the answers, a produce/consume
round trip on the printed bootstrap, and a crash that keeps ports and data."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from engines.kafka import KafkaEngine
from tests.cli import tally

BOOTSTRAP = re.compile(r"^127\.0\.0\.1:\d{2,5}$")


def _quiet(_err: KafkaError) -> None:
    """Connection trouble while a broker (re)starts is retried by librdkafka itself."""


def conf(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "error_cb": _quiet, **extra}


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient(conf(bootstrap))
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)


def produce(bootstrap: str, topic: str, values: list[str]) -> None:
    prod = Producer(conf(bootstrap, acks="all"))
    failures: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err)

    for i, value in enumerate(values):
        prod.produce(topic, key=str(i).encode(), value=value.encode(), on_delivery=delivered)
    assert prod.flush(30) == 0, "messages not acknowledged within 30 s"
    assert failures == []


def consume_all(bootstrap: str, topic: str, count: int, timeout_s: float = 60.0) -> list[str]:
    """Read ``count`` messages from the beginning of ``topic`` with a fresh group."""
    consumer = Consumer(
        conf(
            bootstrap,
            **{
                "group.id": f"g-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            value = msg.value()
            assert value is not None
            got.append(value.decode())
    finally:
        consumer.close()
    return got


def test_up_prints_one_json_line_and_the_broker_round_trips(
    kafka: KafkaEngine, kafka_data_dir: Path
) -> None:
    ran = tally("engines", "up", "kafka", "--format", "json", data_dir=kafka_data_dir)
    assert ran.code == 0, ran.err
    assert len(ran.out.splitlines()) == 1
    doc = ran.json()
    assert set(doc) == {"engines", "env"}
    info = doc["engines"]["kafka"]
    running = kafka.running()
    assert running is not None
    assert info["pid"] == running.pid  # already up: the same process, not a second broker
    assert info["running"] is True and info["version"].startswith("4.")
    assert BOOTSTRAP.match(info["bootstrap"]), info
    assert Path(info["log"]).is_file()
    assert doc["env"] == {"TALLY_KAFKA_BOOTSTRAP": info["bootstrap"]}

    bootstrap = doc["env"]["TALLY_KAFKA_BOOTSTRAP"]
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic)
    values = [f"payment-{i}" for i in range(50)]
    produce(bootstrap, topic, values)
    assert sorted(consume_all(bootstrap, topic, len(values))) == sorted(values)

    # Tally creates its topics itself: asking for an unknown one must not create it.
    admin = AdminClient(conf(bootstrap))
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    meta = admin.list_topics(topic=ghost, timeout=10)
    assert meta.topics[ghost].error is not None
    assert ghost not in admin.list_topics(timeout=10).topics


def test_status_shows_pid_address_and_a_log_with_kafka_s_own_lines(
    kafka: KafkaEngine, kafka_data_dir: Path
) -> None:
    ran = tally("engines", "status", "--format", "json", data_dir=kafka_data_dir)
    assert ran.code == 0, ran.err
    info = ran.json()["engines"]["kafka"]
    running = kafka.running()
    assert running is not None
    assert info["pid"] == running.pid and info["running"] is True
    assert info["bootstrap"] == kafka.bootstrap and BOOTSTRAP.match(info["bootstrap"])
    # Not silent: the slf4j binding is on the classpath, so the broker's own lines are there.
    assert "Kafka Server started" in Path(info["log"]).read_text()


def test_a_killed_kafka_comes_back_on_the_same_port_with_its_data(
    kafka: KafkaEngine, kafka_data_dir: Path
) -> None:
    bootstrap = kafka.bootstrap
    assert bootstrap is not None
    topic = f"survives-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic)
    values = [f"before-crash-{i}" for i in range(20)]
    produce(bootstrap, topic, values)

    before = kafka.running()
    assert before is not None
    os.kill(before.pid, signal.SIGKILL)
    assert before.wait_exit(30)
    down = tally("engines", "status", "--format", "json", data_dir=kafka_data_dir).json()
    assert down["engines"]["kafka"]["running"] is False
    assert down["engines"]["kafka"]["pid"] is None

    ran = tally("engines", "up", "kafka", "--format", "json", data_dir=kafka_data_dir)
    assert ran.code == 0, ran.err
    info = ran.json()["engines"]["kafka"]
    assert info["bootstrap"] == bootstrap
    assert info["pid"] != before.pid
    assert sorted(consume_all(bootstrap, topic, len(values))) == sorted(values)

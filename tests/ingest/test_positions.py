"""Stored positions of another log are refused, never trusted: a topic deleted and
created again under a stopped and under a running ingester, and retention removing
what the sink never read. Each ends in a one-line error naming the partition and the
command that decides; after the operator's ``tally ingest reset`` the store is exact.
The stopped case on both brokers (the development broker has topic ids too), the
running one and retention on Kafka."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from ingest.kafka import (
    base_config,
    committed_offsets,
    committed_positions,
    ensure_topics,
    log_bounds,
    read_ranges,
    topic_id,
)
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage import open_store
from tally.errors import TallyError
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import Broker
from tests.cli import tally
from tests.factories import latest_by_key
from tests.ingest.conftest import env_for, start_ingest
from tests.ingest.reference import Published, build, published
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow


def _events(seed: int, transactions: int) -> Published:
    return build(
        GeneratorConfig(transactions=transactions, merchants=8, days=6, seed=seed, cancel_rate=0.2),
        malformed_rate=0.0,
    )


def _ingest(settings: Settings, log: Path, *args: str) -> tuple[int, list[dict[str, object]]]:
    proc = start_ingest(settings, "--until-idle", "2", *args, log=log)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, json.loads(out)["sinks"] if out.strip() else []


def _recreate(settings: Settings, topic: str) -> None:
    """Delete ``topic`` and create it again (as an operator, or a restore, would)."""
    admin = AdminClient(base_config(settings))
    old = topic_id(admin, topic)
    admin.delete_topics([topic], operation_timeout=30)[topic].result()
    deadline = time.monotonic() + 60
    while True:
        try:
            admin.create_topics(
                [NewTopic(topic, num_partitions=settings.ingest.partitions, replication_factor=1)]
            )[topic].result()
            break
        except Exception:  # the deletion is still being carried out: try again
            assert time.monotonic() < deadline, f"{topic} could not be created again"
            time.sleep(0.2)  # polling the broker's deletion, not timing a result
    while _id_or_none(admin, topic) in (None, old):
        assert time.monotonic() < deadline
        time.sleep(0.1)  # the new topic's metadata reaching the broker


def _id_or_none(admin: AdminClient, topic: str) -> str | None:
    try:
        return topic_id(admin, topic)
    except TallyError:
        return None


def _reset(settings: Settings, sink: str, to: str) -> list[dict[str, object]]:
    ran = tally(
        "ingest", "reset", "--datasource", "payments", "--sink", sink, "--to", to,
        "--by", "ops@test", "--format", "json",
        env=env_for(settings),
    )  # fmt: skip
    assert ran.code == 0, ran.err
    return list(ran.json()["partitions"])


def test_recreated_topic_under_a_stopped_ingester(
    topics: Settings, registry: SpecRegistry, tmp_path: Path, broker: Broker
) -> None:
    settings = topics
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    first, second = _events(3, 1500), _events(4, 600)
    Publisher(settings, topic).send(first.wires)
    code, _ = _ingest(settings, tmp_path / "ingest.log")
    assert code == 0
    before = _positions(settings, registry)

    _recreate(settings, topic)
    Publisher(settings, topic).send(second.wires)
    code, reports = _ingest(settings, tmp_path / "ingest.log")
    assert code != 0, "the store's positions of the old topic were trusted"
    olap = next(r for r in reports if r["sink"] == "olap")
    assert "is of another log" in str(olap["error"])
    assert "tally ingest reset --datasource payments --sink olap" in str(olap["error"])
    # The search group's offsets went with the old topic: it read the new one from 0.
    assert not next(r for r in reports if r["sink"] == "search")["error"]
    assert _positions(settings, registry) == before, "a stopped partition was written"

    rows = _reset(settings, "olap", "earliest")
    new_id = topic_id(AdminClient(base_config(settings)), topic)
    assert {r["now"] for r in rows} == {0} and {r["log"] for r in rows} == {new_id}
    stored = open_store(settings, registry)
    try:
        positions = stored.stored_positions("payments")
    finally:
        stored.close()
    assert {p.log for p in positions.values()} == {new_id}
    assert all(
        p.reset and p.reset.startswith("to earliest by ops@test at ") for p in positions.values()
    )

    code, _ = _ingest(settings, tmp_path / "ingest.log")
    assert code == 0
    assert_exact(settings, registry, published(first.wires + second.wires))


def test_recreated_topic_under_a_running_ingester(
    kafka_broker: Broker, registry: SpecRegistry, tmp_path: Path
) -> None:
    """On Kafka. (On the development broker librdkafka 2.16 itself crashes, SIGSEGV in
    its metadata cache, when a subscribed topic is recreated there; a restarted
    ingester then meets the stopped-ingester case above.)"""
    settings = _settings_on(kafka_broker, registry, tmp_path)
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    first, second = _events(5, 1500), _events(6, 900)
    Publisher(settings, topic).send(first.wires)
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--sink", "olap", log=log)
    deadline = time.monotonic() + 120
    while sum(_positions(settings, registry).values()) < len(first.wires):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the first events were not ingested"
        time.sleep(0.2)  # polling progress
    _recreate(settings, topic)
    Publisher(settings, topic).send(second.wires)
    # Either the partitions stop (the running consumer met the new topic), or the
    # process stopped on the topic missing for a moment: both say so, neither skips.
    said = (
        "is of another log",
        "is past the log's end",
        "was deleted and created",
        "does not exist",
    )
    deadline = time.monotonic() + 120
    while not any(s in log.read_text() for s in said):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)  # polling the ingester's log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)

    _reset(settings, "olap", "earliest")
    code, _ = _ingest(settings, log, "--sink", "olap")
    assert code == 0, log.read_text()[-3000:]
    assert_exact(settings, registry, published(first.wires + second.wires), search=False)


def test_retention_removing_unread_messages_is_reported_as_a_loss(
    kafka_broker: Broker, registry: SpecRegistry, tmp_path: Path
) -> None:
    """Kafka's retention by size (1 MiB segments, 1 MiB kept; the local broker checks
    every second) removes messages a stopped sink never read: the next run says what
    is lost, and after ``--to earliest`` the store holds what was read plus all the log
    still has. One partition, so a megabyte of events fills it soon."""
    from tests.conftest import broker_settings

    settings = broker_settings(kafka_broker, tmp_path / "data", partitions=1)
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    admin = AdminClient(base_config(settings))
    config = {"segment.bytes": str(2**20), "retention.bytes": str(2**20)}
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result()
    ensure_topics(settings, registry)  # the rest as usual
    first, second = _events(7, 1500), _events(8, 40_000)
    Publisher(settings, topic).send(first.wires)
    log = tmp_path / "ingest.log"
    assert _ingest(settings, log, "--sink", "olap")[0] == 0
    before = _positions(settings, registry)
    Publisher(settings, topic).send(second.wires)
    deadline = time.monotonic() + 120
    while log_bounds(settings, topic, [0])[0][0] <= before[(topic, 0)]:
        assert time.monotonic() < deadline, "retention removed nothing unread"
        time.sleep(0.5)  # polling the broker's retention check
    # Retention stops here, so what the log holds stays put while the test reads it.
    keep_all = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("retention.bytes", "-1", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([keep_all]).values():
        future.result()
    low, high = log_bounds(settings, topic, [0])[0]

    code, reports = _ingest(settings, log, "--sink", "olap")
    assert code != 0
    error = str(reports[0]["error"])
    stored = before[(topic, 0)]
    assert f"retention removed offsets {stored}.." in error and "lost to it" in error, error
    assert _positions(settings, registry) == before

    rows = _reset(settings, "olap", "earliest")
    assert rows[0]["now"] == low and rows[0]["stored"] == stored
    assert _ingest(settings, log, "--sink", "olap")[0] == 0
    # Exact: what was read before the loss, and all the log still holds.
    remaining = read_ranges(settings, {(topic, 0): (low, high)})
    kept = published(first.wires)
    kept.good.extend(_decoded(m.value) for m in remaining)
    assert_exact(settings, registry, kept, search=False)


def _committed(settings: Settings, group: str, topic: str, parts: list[int]) -> dict[int, int]:
    try:
        return committed_offsets(settings, group, topic, parts)
    except TallyError as exc:  # a new group's coordinator still loading
        assert exc.transient, exc.message
        return {}


def _settings_on(broker: Broker, registry: SpecRegistry, tmp_path: Path) -> Settings:
    from tests.conftest import broker_settings

    settings = broker_settings(broker, tmp_path / "data")
    ensure_topics(settings, registry)
    return settings


def _decoded(value: bytes | None) -> dict[str, object]:
    from datetime import datetime

    event = orjson.loads(value or b"{}")
    for f in ("occurred_at", "approved_at"):
        event[f] = datetime.fromisoformat(event[f])
    return dict(event)


def _positions(settings: Settings, registry: SpecRegistry) -> dict[tuple[str, int], int]:
    store = open_store(settings, registry)
    try:
        return store.stored_offsets("payments")
    finally:
        store.close()


def test_the_search_sink_reset_waits_for_its_ingesters_and_commits_its_group(
    topics: Settings, registry: SpecRegistry, tmp_path: Path, broker: Broker
) -> None:
    settings = topics
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    group = settings.group("search", spec.name)
    parts = list(range(settings.ingest.partitions))
    first = _events(9, 600)
    Publisher(settings, topic).send(first.wires)
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--sink", "search", log=log)
    deadline = time.monotonic() + 120
    while sum(_committed(settings, group, topic, parts).values()) < len(first.wires):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the search sink committed nothing"
        time.sleep(0.2)  # polling progress
    refused = tally(
        "ingest", "reset", "--datasource", "payments", "--sink", "search", "--to", "latest",
        env=env_for(settings),
    )  # fmt: skip
    assert refused.code == 1 and "active member(s)" in refused.err, refused.err
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)

    Publisher(settings, topic).send(_events(10, 300).wires)  # to be skipped by --to latest
    rows = _reset(settings, "search", "latest")
    ends = {int(str(r["partition"])): int(str(r["log_end"])) for r in rows}
    assert {int(str(r["partition"])): r["now"] for r in rows} == ends
    assert committed_offsets(settings, group, topic, parts) == ends
    reader = Consumer(base_config(settings) | {"group.id": group})
    try:
        marks = committed_positions(reader, [(topic, p) for p in parts])
    finally:
        reader.close()
    new_id = topic_id(AdminClient(base_config(settings)), topic)
    if broker.name == "kafka":  # the development broker keeps no commit metadata
        assert all(m is not None and m.log == new_id for m in marks.values()), marks
        assert all(
            m is not None and (m.reset or "").startswith("to latest by ops@test")
            for m in marks.values()
        )


def test_after_a_reset_to_latest_verify_tells_what_the_store_misses_and_holds_beyond_the_log(
    dev_broker: Broker, registry: SpecRegistry, tmp_path: Path
) -> None:
    """``--to latest`` skips what the new log holds and keeps what the old one gave:
    ``tally verify`` then names both, key by key."""
    settings = _settings_on(dev_broker, registry, tmp_path)
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    first, second = _events(11, 400), _events(12, 200)
    Publisher(settings, topic).send(first.wires)
    log = tmp_path / "ingest.log"
    assert _ingest(settings, log, "--sink", "olap")[0] == 0
    _recreate(settings, topic)
    Publisher(settings, topic).send(second.wires)
    assert _ingest(settings, log, "--sink", "olap")[0] != 0
    _reset(settings, "olap", "latest")
    assert _ingest(settings, log, "--sink", "olap")[0] == 0
    ran = tally("verify", "--datasource", "payments", "--format", "json", env=env_for(settings))
    assert ran.code == 1, ran.err
    found = [d for d in ran.json()["differences"] if d["sink"] == "olap" and "key" in d]
    kinds = {
        kind: {d["key"] for d in found if d["kind"] == kind} for kind in ("missing", "unexpected")
    }
    assert kinds["unexpected"] == set(latest_by_key(spec, first.good))  # beyond the log
    assert kinds["missing"] == set(latest_by_key(spec, second.good))  # skipped by the reset

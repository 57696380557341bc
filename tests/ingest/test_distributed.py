"""Several ingest processes, a zombie, and a broker that stops: the result stays exact."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from ingest.decode import Decoder, Message
from ingest.kafka import consumer_config, ensure_topics
from ingest.runner import Runner
from ingest.sinks import OlapSink
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage import OffsetRange, open_store
from storage.embedded.store import EmbeddedStore
from tally.errors import OffsetMismatch
from tally.settings import IngestSettings, Settings
from tally.specs import SpecRegistry
from tests.brokers import Broker
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import build
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow
OWNERSHIP = re.compile(r"(\w+)/payments (assigned|revoked) \[([0-9, ]*)\]")


def _owned(log: Path, sink: str) -> set[int]:
    """What ``sink`` of the process writing ``log`` owns now: its assignments and
    revocations replayed in order (cooperative rebalancing moves a few at a time)."""
    now: set[int] = set()
    for m in OWNERSHIP.finditer(log.read_text() if log.exists() else ""):
        if m.group(1) != sink:
            continue
        parts = {int(p) for p in m.group(3).split(",") if p.strip()}
        now = now | parts if m.group(2) == "assigned" else now - parts
    return now


def _wait(condition: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _caught_up(settings: Settings, registry: SpecRegistry, ends: dict[int, int]) -> bool:
    """Both sinks have committed everything published: the OLAP sink in the catalog,
    the search sink in its consumer group's offsets (it commits after the index)."""
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    store = open_store(settings, registry)
    try:
        olap = store.stored_offsets(spec.name)
    finally:
        store.close()
    if any(olap.get((topic, p), 0) < end for p, end in ends.items()):
        return False
    probe = Consumer(consumer_config(settings, settings.group("search", spec.name)))
    try:
        committed = probe.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        probe.close()
    return all((tp.offset or 0) >= ends[tp.partition or 0] for tp in committed)


def test_two_processes_split_partitions_and_survive_one_being_killed(
    topics: Settings, registry: SpecRegistry, tmp_path: Path
) -> None:
    settings = topics
    spec = registry.get("payments")
    published = build(
        GeneratorConfig(transactions=30_000, merchants=30, days=10, seed=3, cancel_rate=0.2),
        malformed_rate=0.003,
    )
    publisher = Publisher(settings, settings.topic(spec.datasource.topic))
    half = len(published.wires) // 2
    publisher.send(published.wires[:half])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = start_ingest(settings, "--sink", "all", log=logs[0])
    b = start_ingest(settings, "--sink", "all", log=logs[1])

    def owned(log: Path) -> set[int]:
        return _owned(log, "olap")

    # Both joined and hold disjoint, non-empty shares of the six partitions.
    _wait(
        lambda: (
            owned(logs[0]) and owned(logs[1]) and owned(logs[0]) | owned(logs[1]) == set(range(6))
        ),
        "a split assignment",
    )
    assert not owned(logs[0]) & owned(logs[1])
    publisher.send(published.wires[half:])
    store = open_store(settings, registry)
    _wait(lambda: sum(store.stored_offsets("payments").values()) > half // 2, "progress")
    store.close()
    a.send_signal(signal.SIGKILL)
    a.wait(30)
    # The survivor inherits the dead process's partitions once its session expires.
    _wait(
        lambda: _caught_up(settings, registry, publisher.ends),
        "the survivor to catch up",
        timeout_s=120,
    )
    assert owned(logs[1]) == set(range(6)), "the survivor must take every partition"
    b.send_signal(signal.SIGTERM)  # a clean stop: finish the batch, leave the group
    b.communicate(timeout=60)
    assert b.returncode == 0, logs[1].read_text()[-3000:]
    assert_exact(settings, registry, published)


def test_a_zombie_that_lost_its_partitions_cannot_commit(
    topics: Settings, registry: SpecRegistry
) -> None:
    settings = topics
    spec = registry.get("payments")
    published = build(GeneratorConfig(transactions=300, merchants=5, days=2, seed=8), 0.0)
    Publisher(settings, settings.topic(spec.datasource.topic)).send(published.wires)
    topic = settings.topic(spec.datasource.topic)
    group = settings.group("olap", spec.name)
    decoder = Decoder(spec)

    def take_batch(consumer: Consumer) -> tuple[list[Message], dict[tuple[str, int], OffsetRange]]:
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            for raw in consumer.consume(500, 0.5):
                if raw.error() is None:
                    got.append(
                        Message(
                            topic, raw.partition() or 0, raw.offset() or 0, raw.key(), raw.value()
                        )
                    )
        assert got, "no messages"
        ranges: dict[tuple[str, int], OffsetRange] = {}
        for m in got:
            have = ranges.get((topic, m.partition))
            ranges[(topic, m.partition)] = OffsetRange(
                have.start if have else m.offset, m.offset + 1
            )
        return got, ranges

    # The zombie-to-be reads a batch, then loses its partitions before writing it (its
    # session expired during a pause, or a revoke raced the batch in flight).
    zombie = Consumer(consumer_config(settings, group))
    zombie.subscribe([topic])
    stale_batch, stale_ranges = take_batch(zombie)
    zombie.close()
    zombie_store = open_store(settings, registry)
    assert isinstance(zombie_store, EmbeddedStore)
    zombie_sink = OlapSink(settings, spec, zombie_store)

    # Meanwhile the group moves on: a healthy consumer takes over and commits.
    healthy = Consumer(consumer_config(settings, group))
    healthy.subscribe([topic])
    healthy_store = open_store(settings, registry)
    assert isinstance(healthy_store, EmbeddedStore)
    healthy_sink = OlapSink(settings, spec, healthy_store)
    batch, ranges = take_batch(healthy)
    assert set(ranges) & set(stale_ranges), "the healthy consumer took the zombie's partitions"
    healthy_sink.write(decoder.decode(batch), ranges)

    with pytest.raises(OffsetMismatch):
        zombie_sink.write(decoder.decode(stale_batch), stale_ranges)
    stored = healthy_store.stored_offsets(spec.name)
    assert all(stored[tp] == r.end for tp, r in ranges.items())
    healthy.close()
    healthy_sink.close()
    zombie_sink.close()


def test_broker_stopped_for_ten_seconds_mid_run(
    broker: Broker, registry: SpecRegistry, data_dir: Path, tmp_path: Path
) -> None:
    """The broker is frozen (SIGSTOP) for 10 s while ingest runs. Tansu's memory
    storage survives a freeze, unlike a restart, so the outcome can be checked."""
    try:
        settings = Settings(
            data_dir=data_dir,
            kafka_bootstrap=broker.bootstrap,
            topic_namespace=f"outage{broker.name}.",
            ingest=IngestSettings(batch_max_wait_s=0.1, search_refresh_s=0.1),
        )
        ensure_topics(settings, registry)
        spec = registry.get("payments")
        published = build(
            GeneratorConfig(transactions=20_000, merchants=20, days=5, seed=21, cancel_rate=0.2),
            malformed_rate=0.003,
        )
        publisher = Publisher(settings, settings.topic(spec.datasource.topic))
        third = len(published.wires) // 3
        publisher.send(published.wires[:third])
        log = tmp_path / "ingest.log"
        proc = start_ingest(settings, "--sink", "all", log=log)
        store = open_store(settings, registry)
        _wait(lambda: sum(store.stored_offsets("payments").values()) > 0, "progress")
        store.close()
        broker.pause()
        time.sleep(10)  # the outage itself
        broker.resume()
        # Not --until-idle: the publisher's own reconnection after the freeze can take
        # longer than any quiet period, and an ingester that found the topic consumed
        # before the rest arrived would rightly stop. Wait for the facts instead.
        publisher.send(published.wires[third:])
        _wait(
            lambda: _caught_up(settings, registry, publisher.ends),
            "both sinks to catch up after the outage",
            timeout_s=300,
        )
        proc.send_signal(signal.SIGTERM)  # a clean stop: finish the batch, leave the group
        proc.communicate(timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert_exact(settings, registry, published)
    finally:
        broker.resume()


def test_what_a_batch_holds_of_partitions_revoked_meanwhile_is_not_written(
    topics: Settings, registry: SpecRegistry
) -> None:
    """A batch is filling when a second member joins and takes half the partitions.
    The messages of those partitions already in the batch belong to the new owner now:
    written anyway, they would fence it (OLAP) or hold its search shard."""
    # One consume call returns 10,000 messages; a batch of 10,500 then waits for more,
    # in a second call, during which the rebalance comes.
    ingest = topics.ingest.model_copy(update={"batch_max_wait_s": 10.0, "batch_max_rows": 10_500})
    settings = topics.model_copy(update={"ingest": ingest})
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    published = build(GeneratorConfig(transactions=20_000, merchants=5, days=2, seed=9), 0.0)
    publisher = Publisher(settings, topic)
    publisher.send(published.wires[:10_000])
    stop = threading.Event()
    runner = Runner(settings, spec, OlapSink(settings, spec, open_store(settings, registry)), stop)
    thread = threading.Thread(target=runner.run, name="runner")
    thread.start()
    newcomer = Consumer(consumer_config(settings, settings.group("olap", spec.name)))
    try:
        _wait(lambda: runner.report.assigned == list(range(6)), "the runner to own everything")
        newcomer.subscribe([topic])

        def revoked() -> bool:
            newcomer.poll(0.1)
            return runner.report.assigned != list(range(6))

        _wait(revoked, "the newcomer's join to revoke some of the runner's partitions")
        # Still unwritten: the revoke came while the first batch was open (a batch
        # handed over earlier would have been written before the revoke completed).
        assert runner.report.batches == 0, "the batch closed before the rebalance"
        taken = set(range(6)) - set(runner.report.assigned)
        publisher.send(published.wires[10_000:])  # enough to close the batch on size
        _wait(lambda: runner.report.batches > 0, "the runner's batch to be written")
        store = open_store(settings, registry)
        written = {p for (_t, p) in store.stored_offsets(spec.name)}
        store.close()
        assert written, "the runner wrote nothing"
        assert not written & taken, f"wrote {sorted(written & taken)}, revoked meanwhile"
    finally:
        stop.set()
        thread.join(60)
        newcomer.close()

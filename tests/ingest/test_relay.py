"""The relay (the OLAP sink on engines that ingest from Kafka, e.g. Druid): each
source message ends up exactly once in the refined topic or the dead-letter topic —
through duplicates, malformed messages, SIGKILLs and a zombie member.

Kafka only: the development broker's transactions are broken (it hands aborted
records to read_committed consumers), and exactly-once here *is* Kafka's transactions.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ingest.deadletter import list_dead_letters, raw_value
from ingest.kafka import base_config, consumer_config, ensure_topics
from ingest.relay import KafkaRelay
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage.refined import OFFSET_HEADER, refined_topic, rollup_topic
from tally.errors import BrokerUnavailable, OffsetMismatch, TallyError
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.factories import latest_by_key, reference_rollup
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import Published, build

pytestmark = pytest.mark.slow


def _settings(broker: KafkaBroker, data_dir: Path, batch_max_rows: int = 20_000) -> Settings:
    """The Druid backend (the relay), short transactions; small batches where a crash
    must land inside the work rather than after one batch that holds all of it."""
    base = broker_settings(broker, data_dir)
    ingest = {"transaction_timeout_s": 5.0, "batch_max_rows": batch_max_rows}
    return base.model_copy(
        update={
            "store": StoreSettings(backend="druid", gc_grace_s=0.0),
            "ingest": base.ingest.model_copy(update=ingest),
        }
    )


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_exactly(settings: Settings, topic: str, timeout_s: float = 90) -> list[Record]:
    """Every committed record of ``topic``, read_committed, up to the high watermark
    as a read_uncommitted client sees it now: a transaction still open (a crashed
    member's, until the coordinator aborts it) is waited out, not cut off."""
    conf = base_config(settings) | {
        "group.id": f"test-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }
    probe = Consumer(conf | {"isolation.level": "read_uncommitted"})
    try:
        meta = probe.list_topics(topic, timeout=10).topics[topic]
        ends = {
            p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
    finally:
        probe.close()
    consumer = Consumer(conf | {"isolation.level": "read_committed"})
    out: list[Record] = []
    done = {p for p, end in ends.items() if end == 0}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends):
            assert time.monotonic() < deadline, f"{topic}: not read to its end: {ends}, {done}"
            for m in consumer.consume(1000, 0.2):
                err = m.error()
                part = m.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and (m.offset() or 0) >= ends[part]:
                        done.add(part)
                    continue
                raw = m.headers() or []
                items = list(raw.items()) if isinstance(raw, dict) else raw
                hdrs = {k: v for k, v in items if isinstance(v, bytes)}
                out.append(Record(part, m.offset() or 0, m.key(), m.value(), hdrs))
    finally:
        consumer.close()
    return out


def assert_relayed_exactly_once(
    settings: Settings, registry: SpecRegistry, published: Published
) -> None:
    spec = registry.get("payments")
    source = read_exactly(settings, settings.topic(spec.datasource.topic))
    assert len(source) == len(published.wires)
    refined = read_exactly(settings, refined_topic(settings, spec))
    letters = list_dead_letters(settings, spec)

    # Each source message once, in exactly one of the two topics.
    rows = Counter((r.partition, int(r.headers[OFFSET_HEADER])) for r in refined)
    dead = Counter((d["partition"], d["offset"]) for d in letters)
    doubled = [k for k, n in (rows + dead).items() if n > 1]
    assert not doubled, f"{len(doubled)} source messages relayed twice, e.g. {doubled[:5]}"
    assert not rows.keys() & dead.keys()
    wanted = {(m.partition, m.offset) for m in source}
    got = rows.keys() | dead.keys()
    assert got == wanted, (len(wanted - got), len(got - wanted))

    # The right ones in each: good events as rows, malformed ones as dead letters.
    ids = Counter(orjson.loads(r.value or b"")["event_id"] for r in refined)
    assert ids == Counter(e["event_id"] for e in published.good)
    values = Counter(raw_value(d) or b"" for d in letters)
    assert values == published.malformed
    assert all(d.get("reason") and d.get("sink") == "olap" for d in letters)

    assert_rollup_deltas_exact(settings, spec, published)

    # Rows are flat and typed as the supervisor spec says, keyed, on their partition.
    by_offset = {(m.partition, m.offset): m for m in source}
    for r in refined[:200]:
        row = orjson.loads(r.value or b"")
        assert set(row) == set(spec.columns)
        assert isinstance(row["approved_at"], int) and isinstance(row["amount"], int)
        assert r.key == row["txn_id"].encode()
        origin = by_offset[(r.partition, int(r.headers[OFFSET_HEADER]))]
        assert orjson.loads(origin.value or b"")["event_id"] == row["event_id"]


def assert_rollup_deltas_exact(
    settings: Settings, spec: DatasourceSpec, published: Published
) -> None:
    """Each rollup's deltas topic, summed per (bucket, dimensions) as Druid sums it,
    equals the rollup recomputed from the latest state of every key: no delta lost
    or doubled by a crash, a fence or a restart (the key state came back from its
    changelog each time)."""
    latest = latest_by_key(spec, published.good)
    for rollup in spec.rollups:
        sums: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(spec.parsed_metrics))
        for r in read_exactly(settings, rollup_topic(settings, spec, rollup)):
            row = orjson.loads(r.value or b"")
            bucket = datetime.fromtimestamp(row["bucket"] / 1000, UTC)
            group = sums[(bucket, *(row[d] for d in rollup.dimensions))]
            for i, metric in enumerate(spec.parsed_metrics):
                group[i] += row[metric.name]
        got = {k: tuple(v) for k, v in sums.items() if any(v)}
        want = {
            (k[0].astimezone(UTC), *k[1:]): v
            for k, v in reference_rollup(spec, rollup.name, latest).items()
        }
        assert got == want, f"{rollup.name}: {len(got.keys() ^ want.keys())} groups differ"


def _committed(settings: Settings) -> int:
    """What the relay's group has committed, summed (read_uncommitted: no waiting)."""
    topic = settings.topic("payments.v1")
    consumer = Consumer(
        base_config(settings)
        | {"group.id": settings.group("olap", "payments"), "isolation.level": "read_uncommitted"}
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        deadline = time.monotonic() + 30
        while True:
            try:
                got = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
                break
            except KafkaException:  # the group's coordinator is moving: ask again
                assert time.monotonic() < deadline, "the group's committed offsets never came"
                time.sleep(0.2)
        return sum(tp.offset for tp in got if tp.offset is not None and tp.offset > 0)
    finally:
        consumer.close()


def _wait_for_progress(
    settings: Settings, above: int, procs: list[subprocess.Popen[bytes]], log: Path
) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = _committed(settings)
        if now > above:
            return now
        for proc in procs:
            assert proc.poll() is None, "ingest exited early: " + log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError("the relay made no progress: " + log.read_text()[-3000:])


def _finish(settings: Settings, log: Path) -> dict[str, object]:
    final = start_ingest(settings, "--sink", "olap", "--until-idle", "4", log=log)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, log.read_text()[-3000:]
    report: dict[str, object] = orjson.loads(out)["sinks"][0]
    return report


def test_relay_writes_each_message_once_to_the_refined_or_dead_letter_topic(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry, tmp_path: Path
) -> None:
    settings = _settings(kafka_broker, data_dir)
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=5_000, merchants=10, days=5, seed=3, duplicate_rate=0.05),
        malformed_rate=0.02,
    )
    assert published.malformed and len(published.good) > 5_000  # states and duplicates
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    report = _finish(settings, tmp_path / "ingest.log")
    assert report["consumed"] == len(published.wires)
    assert report["rejected"] == sum(published.malformed.values())
    assert report["written"] == len(published.good)
    assert_relayed_exactly_once(settings, registry, published)


def test_relay_exactly_once_across_sigkills(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry, tmp_path: Path
) -> None:
    """SIGKILLed five times while events stream in (caught up, small batches: a kill
    lands between a batch's rows and its offsets as often as anywhere), then
    restarted: each source message is still in the refined or the dead-letter topic
    exactly once, and the rollups' deltas still sum to the exact rollups."""
    settings = _settings(kafka_broker, data_dir, batch_max_rows=500)
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=30_000, merchants=20, days=10, seed=13, duplicate_rate=0.03),
        malformed_rate=0.005,
    )
    publisher = Publisher(settings, settings.topic("payments.v1"))
    stages, rng, log = 5, random.Random(7), tmp_path / "ingest.log"
    size = -(-len(published.wires) // stages)
    for stage in range(stages):
        before = _committed(settings)
        proc = start_ingest(settings, "--sink", "olap", log=log)
        wires = published.wires[stage * size : (stage + 1) * size]
        stream = threading.Thread(target=publisher.send, args=(wires,), kwargs={"rate": 4000})
        stream.start()
        try:
            _wait_for_progress(settings, before, [proc], log)
            time.sleep(rng.uniform(0.2, 1.5))  # a random point inside the stream
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            stream.join()
    _finish(settings, log)
    assert_relayed_exactly_once(settings, registry, published)


def test_a_zombie_relay_is_fenced_by_the_group(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry, tmp_path: Path
) -> None:
    """Two relays in one group; one freezes (SIGSTOP) mid-work past its session, so
    the other takes its partitions; thawed, its open transaction must not land."""
    settings = _settings(kafka_broker, data_dir, batch_max_rows=500)
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=40_000, merchants=20, days=10, seed=23, duplicate_rate=0.03),
        malformed_rate=0.005,
    )
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (start_ingest(settings, "--sink", "olap", "--until-idle", "4", log=lg) for lg in logs)
    owning = re.compile(r"assigned \[\d")
    deadline = time.monotonic() + 60
    while not all(lg.exists() and owning.search(lg.read_text()) for lg in logs):
        assert time.monotonic() < deadline, "the two relays never shared the partitions"
        time.sleep(0.1)
    _wait_for_progress(settings, _committed(settings), [a, b], logs[0])  # both at work
    seen = len(logs[1].read_text())
    a.send_signal(signal.SIGSTOP)
    try:
        # b takes a's partitions once a's session expires (3 s); a still holds its open
        # transaction. Let b commit batches of them before a wakes.
        deadline = time.monotonic() + 60
        while not owning.search(logs[1].read_text()[seen:]):
            # (b cannot finish first: a's partitions are not consumed)
            assert b.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        a.send_signal(signal.SIGCONT)
    for proc, lg in zip((a, b), logs, strict=True):
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            tails = "\n---\n".join(f"{x.name}: {x.read_text()[-2500:]}" for x in logs)
            pytest.fail(f"{lg.name} never finished; the logs end:\n{tails}")
        assert proc.returncode == 0, lg.read_text()[-3000:]
    assert_relayed_exactly_once(settings, registry, published)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        # The group is rebalancing: the batch's generation may be gone once it is done,
        # and only the rebalance callbacks (which wait for this batch) renew it.
        (KafkaError.REBALANCE_IN_PROGRESS, OffsetMismatch),
        (KafkaError.ILLEGAL_GENERATION, OffsetMismatch),
        (KafkaError._TIMED_OUT, BrokerUnavailable),  # the same batch, retried
    ],
)
def test_an_aborted_transaction_is_re_sought_when_the_group_refused_it_else_retried(
    kafka_broker: KafkaBroker,
    data_dir: Path,
    registry: SpecRegistry,
    code: int,
    outcome: type[TallyError],
) -> None:
    """A transaction the group coordinator refused because the group is rebalancing
    must not be retried with the same group metadata (that spun until
    max.poll.interval.ms in a CI run: the zombie test's 300 s); the abort is real, on
    a real producer, and the producer stays usable."""
    settings = _settings(kafka_broker, data_dir)
    ensure_topics(settings, registry)
    spec = registry.get("payments")
    relay = KafkaRelay(settings, spec)
    consumer = Consumer(consumer_config(settings, settings.group("olap", spec.name)))
    try:
        relay.bind(consumer)
        prod = relay._producer
        assert prod is not None
        prod.begin_transaction()
        prod.produce(relay.topic, value=b"{}", key=b"k", partition=0)
        failure = relay._failed(KafkaException(KafkaError(code)))
        assert type(failure) is outcome, failure.message
        assert relay._producer is prod  # aborted, not dropped: it can begin again
        prod.begin_transaction()
        prod.abort_transaction(10)
    finally:
        relay.close()
        consumer.close()

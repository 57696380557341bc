"""A lost, truncated or altered segment file: detected, isolated, rebuilt from the log.

End to end on the development broker with real ingestion into both sinks, over eight
days across a month boundary: the first three days packed in one file, the others
compacted to one file each. Three files are then damaged the same way (deleted,
truncated or with one byte flipped): the pack (three base partitions), one day's
file, and the October partition of the daily rollup. Each time:

- ``tally verify`` reports exactly those partitions, and exits 1;
- queries that read none of them answer exactly as before; one that reads one fails
  with PartitionDamaged naming it, never a path; ``tally compaction status`` shows them;
- ``tally verify --repair`` rebuilds them from the log, and the store, its rollups and
  the index equal the reference again; a second verify is clean.

On real Kafka, with the start of the log deleted (what retention does): the loss is
reported with its keys and range and the partition is left damaged; with
``--accept-loss`` it is rebuilt from what the log still holds.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from ingest.kafka import base_config, ensure_topics
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage import open_reader, open_store
from storage.embedded.store import EmbeddedStore
from storage.protocol import SegmentInfo
from tally.errors import PartitionDamaged
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import Broker, KafkaBroker
from tests.cli import tally
from tests.compaction.verifying import ingest_until_idle as _ingest
from tests.compaction.verifying import verify_json
from tests.conftest import broker_settings
from tests.ingest.conftest import env_for
from tests.ingest.reference import Published, build
from tests.ingest.verify import assert_exact

SEOUL = ZoneInfo("Asia/Seoul")
PACKED = ("2026-10-28", "2026-10-29", "2026-10-30")
DAY = "2026-11-03"
ROLLUP = ("payments_daily", "2026-10")


def _verify(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    return verify_json(settings, *args, recheck="0.2")


def _published(settings: Settings, config: GeneratorConfig) -> Published:
    published = build(config, malformed_rate=0.02)
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    return published


def _config(**changes: Any) -> GeneratorConfig:
    base: dict[str, Any] = dict(
        transactions=800,
        merchants=5,
        days=8,
        start=datetime(2026, 10, 28, tzinfo=SEOUL),
        seed=22,
        cancel_rate=0.3,
        cancel_delay_max_h=72.0,
        duplicate_rate=0.05,
        out_of_order_rate=0.1,
        drain=False,
    )
    return GeneratorConfig(**(base | changes))


def _layout(settings: Settings, registry: SpecRegistry) -> dict[str, SegmentInfo]:
    """Compact every partition to one file, pack the first three days; the files."""
    store = open_store(settings, registry)
    assert isinstance(store, EmbeddedStore)
    try:
        for name in store.datasource_names("payments"):
            parts: dict[str, list[int]] = {}
            for seg in store.live_segments(name):
                parts.setdefault(seg.partition, []).append(seg.id)
            for part, ids in parts.items():
                if len(ids) > 1:
                    store.compactor.compact(name, part, ids)
        live = {s.partition: s for s in store.live_segments("payments")}
        assert store.compactor.pack("payments", [live[p].id for p in PACKED]) is not None
        files = {s.partition: s for s in store.live_segments("payments")}
        rollup = [s for s in store.live_segments(ROLLUP[0]) if s.partition == ROLLUP[1]]
    finally:
        store.close()
    assert len(rollup) == 1 and {files[p].path for p in PACKED} == {files[PACKED[0]].path}
    return {"pack": files[PACKED[0]], "day": files[DAY], "rollup": rollup[0]}


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:  # one bit flipped in the middle: only the digest tells
        flipped = bytearray(path.read_bytes())
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))


def _healthy_answers(settings: Settings, registry: SpecRegistry) -> dict[str, Any]:
    """Queries that read no damaged partition."""
    reader = open_reader(settings, registry)
    try:
        nov = reader.query(
            "SELECT merchant_id, count(*), sum(amount) FROM payments"
            " WHERE approved_at >= '2026-10-31T15:00:00+00:00'"
            " AND approved_at < TIMESTAMP '2026-11-02 00:00:00+09:00' GROUP BY 1 ORDER BY 1"
        ).rows
        hourly = reader.query("SELECT count(*), sum(net_amount) FROM payments_hourly").rows
        daily_nov = reader.query(
            "SELECT sum(net_amount) FROM payments_daily WHERE bucket >= '2026-11-01T00:00:00+09:00'"
        ).rows
    finally:
        reader.close()
    return {"nov": nov, "hourly": hourly, "daily_nov": daily_nov}


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped"])
def test_a_damaged_file_is_found_isolated_and_rebuilt_from_the_log(
    dev_broker: Broker, data_dir: Path, registry: SpecRegistry, how: str
) -> None:
    settings = broker_settings(dev_broker, data_dir, partitions=3)
    ensure_topics(settings, registry)
    published = _published(settings, _config())
    _ingest(settings, registry)
    files = _layout(settings, registry)
    code, clean = _verify(settings)
    assert code == 0 and clean["damage"] is None, clean
    before = _healthy_answers(settings, registry)
    assert before["nov"] and before["hourly"][0][0] > 0

    for seg in files.values():
        _damage(Path(seg.path), how)

    code, found = _verify(settings)
    expected = {f"payments/{p}" for p in (*PACKED, DAY)} | {"/".join(ROLLUP)}
    assert code == 1 and set(found["damage"]["left"]) == expected, found["damage"]
    assert found["differences"] == [], found["differences"][:5]  # the rest compares clean
    assert _healthy_answers(settings, registry) == before
    reader = open_reader(settings, registry)
    try:
        for sql in (
            "SELECT count(*) FROM payments",
            "SELECT count(*) FROM payments WHERE approved_at >= '2026-11-03T00:00:00+09:00'",
            "SELECT sum(net_amount) FROM payments_daily",
        ):
            with pytest.raises(PartitionDamaged) as refused:
                reader.query(sql)
            assert "/" not in refused.value.message.replace("tally verify --repair", ""), (
                refused.value.message
            )
        assert "2026-11-03" in str(
            _refusal(reader, "SELECT * FROM payments WHERE merchant_id = 'm0001'")
        )
    finally:
        reader.close()
    status = tally("compaction", "status", "--format", "json", env=env_for(settings))
    shown = {
        f"{r['datasource']}/{r['partition']}" for r in status.json()["partitions"] if r["damaged"]
    }
    assert shown == expected

    code, repaired = _verify(settings, "--repair")
    assert code == 0, repaired
    assert set(repaired["damage"]["restored"]) == expected and repaired["damage"]["lost"] == []
    assert_exact(settings, registry, published)
    assert _healthy_answers(settings, registry) == before
    code, again = _verify(settings)
    assert code == 0 and again["damage"] is None and again["differences"] == [], again


def _refusal(reader: Any, sql: str) -> str:
    try:
        reader.query(sql)
    except PartitionDamaged as exc:
        return exc.message
    raise AssertionError(f"{sql} was answered over a damaged partition")


def test_what_retention_removed_is_reported_as_lost(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry
) -> None:
    """Real Kafka: the first publication's offsets deleted (as retention does) after
    both sinks took them, then one day's file lost: its keys of that publication are
    reported lost, with the range and the offsets removed; --accept-loss rebuilds
    the day from what the log holds, the loss listed again."""
    settings = broker_settings(kafka_broker, data_dir, partitions=2)
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    first = _published(settings, _config(transactions=300, seed=5, days=4))
    _ingest(settings, registry)
    admin = AdminClient(base_config(settings))
    ends = {p: _end(settings, topic, p) for p in range(2)}
    gone = admin.delete_records([TopicPartition(topic, p, end) for p, end in ends.items()])
    for future in gone.values():
        future.result(30)
    _published(settings, _config(transactions=100, seed=6, days=4, first_seq=300))
    _ingest(settings, registry)
    store = open_store(settings, registry)
    try:
        day = next(s for s in store.live_segments("payments") if s.partition == "2026-10-29")
    finally:
        store.close()
    Path(day.path).unlink()
    first_keys = {e["txn_id"] for e in first.good if _day_of(e["approved_at"]) == "2026-10-29"}

    code, refused = _verify(settings, "--repair")
    damage = refused["damage"]
    assert code == 1 and damage["left"] == ["payments/2026-10-29"], damage
    (loss,) = damage["lost"]
    assert loss["partition"] == "2026-10-29" and set(loss["keys"]) == first_keys
    assert loss["offsets_removed"] == {str(p): [0, end] for p, end in ends.items()}
    assert datetime.fromisoformat(loss["from"]) == datetime(2026, 10, 29, tzinfo=SEOUL)
    assert datetime.fromisoformat(loss["to"]) == datetime(2026, 10, 30, tzinfo=SEOUL)

    code, accepted = _verify(settings, "--repair", "--accept-loss")
    assert accepted["damage"]["restored"] == ["payments/2026-10-29"], accepted["damage"]
    assert set(accepted["damage"]["lost"][0]["keys"]) == first_keys
    code, after = _verify(settings)
    assert after["damage"] is None


def _day_of(at: datetime) -> str:
    return at.astimezone(SEOUL).date().isoformat()


def _end(settings: Settings, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer

    from ingest.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, "damage-probe"))
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
    finally:
        consumer.close()


def test_the_watcher_finds_a_lost_file_and_rebuilds_it_when_told_to(
    dev_broker: Broker, data_dir: Path, registry: SpecRegistry
) -> None:
    from prometheus_client import REGISTRY

    from compaction.watcher import Watcher

    settings = broker_settings(dev_broker, data_dir, partitions=2)
    ensure_topics(settings, registry)
    published = _published(settings, _config(transactions=200, seed=9, days=3))
    _ingest(settings, registry)
    store = open_store(settings, registry)
    try:
        lost = next(s for s in store.live_segments("payments") if s.partition == "2026-10-29")
        Path(lost.path).unlink()

        def gauge() -> float | None:
            return REGISTRY.get_sample_value(
                "tally_store_damaged_partitions",
                {"datasource": "payments", "partition": "2026-10-29"},
            )

        watching = Watcher(settings, registry, store)
        watching.tick()
        assert [(d.datasource, d.partition) for d in watching.damage] == [
            ("payments", "2026-10-29")
        ]
        assert gauge() == 1
        told = settings.compaction.model_copy(update={"repair_damaged": True})
        repairing = Watcher(settings.model_copy(update={"compaction": told}), registry, store)
        repairing.tick()
        assert repairing.damage == [] and gauge() is None
    finally:
        store.close()
    assert_exact(settings, registry, published)

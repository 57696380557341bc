"""What a datasource should hold, re-derived from its topic (for ``tally verify``).

Both sinks are fed from the topic, so the topic is the arbiter (a store and an index
fed separately drift unless something reconciles them from the durable log). It is
read from the beginning by a consumer of its own — a fresh group id, partitions
assigned rather than subscribed, nothing ever committed, so no sink's position moves —
and decoded and validated exactly as ingestion does: what ingestion dead-letters is
skipped here too. The result is the latest (version, event_id) per key.

Where the log ends: the development broker misreports end offsets, so they are not
consulted. Reading stops once nothing arrived for ``idle_s`` (as ``tally ingest
--until-idle`` does), and each partition stops at its first message produced after
verification began — so a topic written continuously still ends, at about what it
held when verification started. Silence from a broker that stopped answering is
not taken for the end.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from ingest.decode import Decoder, Message
from ingest.kafka import base_config, translate
from tally.errors import BrokerError, BrokerUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec

SOURCE_PARTITION = "_source_partition"
SOURCE_OFFSET = "_source_offset"
_FOLD_ROWS = 200_000  # decoded rows kept before folding them to one per key


@dataclass
class LogState:
    topic: str
    partitions: list[int]
    rows: pa.Table  # latest row per key, plus where its event was read
    ends: dict[int, int] = field(default_factory=dict)  # partition → offset after the last read
    starts: dict[int, int] = field(default_factory=dict)  # partition → first offset it holds
    events: int = 0
    rejected: int = 0  # messages ingestion dead-letters (skipped here)

    @property
    def removed(self) -> dict[int, int]:
        """Partitions whose start retention (or a deletion) removed: partition → the
        first offset still held (everything before it is gone)."""
        return {p: start for p, start in sorted(self.starts.items()) if start > 0}


def latest_rows(spec: DatasourceSpec, table: pa.Table) -> pa.Table:
    """The greatest (version, event_id) per key; of several copies of that event (a
    redelivery), the earliest — the one a sink that consumed up to there must hold."""
    ds = spec.datasource
    if table.num_rows <= 1:
        return table
    ordered = table.sort_by(
        [
            (ds.key, "ascending"),
            (ds.version, "descending"),
            (ds.event_id, "descending"),
            (SOURCE_OFFSET, "ascending"),
        ]
    )
    keys = ordered.column(ds.key).combine_chunks()
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), first]))


def _consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(
        base_config(settings)
        | {
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 100,
        }
    )


def read_log(settings: Settings, spec: DatasourceSpec, *, idle_s: float = 2.0) -> LogState:
    topic = settings.topic(spec.datasource.topic)
    consumer = _consumer(settings, f"{settings.topic_namespace}tally.verify.{uuid.uuid4().hex}")
    try:
        return _read(consumer, topic, spec, idle_s)
    except KafkaException as exc:
        raise translate(exc, f"reading {topic}") from exc
    finally:
        consumer.close()


def _read(consumer: Consumer, topic: str, spec: DatasourceSpec, idle_s: float) -> LogState:
    meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise BrokerError(f"topic {topic} does not exist (run: tally topics create)")
    partitions = sorted(meta.partitions)
    state = LogState(topic, partitions, pa.table({}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    started_ms = time.time() * 1000
    decoder = Decoder(spec)
    tables: list[pa.Table] = []
    held = 0
    done: set[int] = set()
    quiet_since = time.monotonic()
    while len(done) < len(partitions) and time.monotonic() - quiet_since < idle_s:
        messages = []
        for m in consumer.consume(1000, 0.2):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerError(f"topic {topic} does not exist (run: tally topics create)")
                continue
            part = m.partition() or 0
            kind, stamp = m.timestamp()
            if part in done:
                continue
            if kind != TIMESTAMP_NOT_AVAILABLE and stamp > started_ms:
                done.add(part)  # produced after we began: the partition's end for us
                consumer.pause([TopicPartition(topic, part)])
                continue
            offset = m.offset() or 0
            state.starts.setdefault(part, offset)  # read from the beginning: the log's start
            messages.append(Message(topic, part, offset, m.key(), m.value(), stamp))
            state.ends[part] = offset + 1
        if not messages:
            continue
        quiet_since = time.monotonic()
        tables.append(_decode(decoder, messages, state))
        held += tables[-1].num_rows
        if held > _FOLD_ROWS:
            tables = [latest_rows(spec, pa.concat_tables(tables))]
            held = tables[0].num_rows
    try:
        consumer.list_topics(topic, timeout=2)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"reading {topic}: the broker stopped answering, the end of the log is unknown"
        ) from exc
    for part in set(partitions) - set(state.starts):  # nothing read: empty, or all removed
        low, _high = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
        state.starts[part] = max(0, low or 0)
    if not tables:
        tables = [_decode(decoder, [], state)]
    state.rows = latest_rows(spec, pa.concat_tables(tables))
    return state


def _decode(decoder: Decoder, messages: list[Message], state: LogState) -> pa.Table:
    """Decode like ingestion, keeping where each accepted row was read from."""
    decoded = decoder.decode(messages)
    bad = {id(r.message) for r in decoded.rejected}
    kept = [m for m in messages if id(m) not in bad]  # decoding keeps message order
    state.events += len(messages)
    state.rejected += len(decoded.rejected)
    return decoded.table.append_column(
        SOURCE_PARTITION, pa.array([m.partition for m in kept], pa.int32())
    ).append_column(SOURCE_OFFSET, pa.array([m.offset for m in kept], pa.int64()))

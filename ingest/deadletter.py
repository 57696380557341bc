"""Dead letters: bad input never stops a partition, and nothing is lost or doubled.

The OLAP sink records each unusable message in the catalog in the same transaction
that moves its offsets past it (an outbox), then publishes it to the datasource's
dead-letter topic with the reason, sink and source topic/partition/offset in
headers. Kafka has no exactly-once produce without transactions (and the dev broker
does not filter aborted ones), so publishing is made idempotent instead: every
letter carries a deterministic id, and after a crash the publisher first scans the
dead-letter topic past the last acknowledged position for pending ids that did land.

Dead letters are owned by the OLAP sink, the system of record: a message that fails
validation is dead-lettered once, not once per sink; the search sink counts and
skips it.
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ingest.decode import Rejected
from ingest.kafka import base_config, flush, producer, translate
from storage.deadletters import FIELDS as _FIELDS
from storage.deadletters import PREFIX as H
from storage.deadletters import Headers, headers
from storage.protocol import DeadLetterOutbox, DeadLetterRecord
from tally.errors import BrokerUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec


def record(rejected: Rejected, datasource: str, sink: str) -> DeadLetterRecord:
    m = rejected.message
    return DeadLetterRecord(
        id=f"{datasource}:{m.topic}:{m.partition}:{m.offset}",
        datasource=datasource,
        sink=sink,
        topic=m.topic,
        partition=m.partition,
        offset=m.offset,
        key=m.key,
        value=m.value,
        reason=rejected.reason,
        failed_at=time.time(),
    )


def parse_headers(raw: Headers | dict[str, str | bytes | None] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = list(raw.items()) if isinstance(raw, dict) else (raw or [])
    for name, value in items:
        if name.startswith(H) and name[len(H) :] in _FIELDS:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            field = name[len(H) :]
            out[field] = int(text) if field in ("partition", "offset") and text else text
    if "failed_at" in out:
        out["failed_at"] = float(out["failed_at"])
    return out


@dataclass(frozen=True)
class Seen:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    meta: dict[str, Any]


def read_topic(
    settings: Settings, topic: str, start: dict[int, int] | None = None, timeout_s: float = 30.0
) -> Iterator[Seen]:
    """Read a topic from ``start`` (default: the beginning) to its end: each partition
    until a fetch answers end-of-partition. Not a quiet period (a consumer can take
    longer than any to fetch its first message, just after a broker outage, and would
    miss letters that are there), and not end offsets (the dev broker misreports them).
    A partition that neither yields a message nor ends within ``timeout_s`` raises
    BrokerUnavailable."""
    consumer = Consumer(
        base_config(settings)
        | {
            "group.id": f"{settings.topic_namespace}tally.reader",  # never joined
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or (
            meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            return  # no such topic: nothing was ever published to it
        if meta.error is not None:
            # Just after a broker restart a topic's metadata can come with an error (no
            # leader yet). Reading nothing then would make the publisher's recovery find
            # none of the letters that did land, and produce them a second time.
            raise BrokerUnavailable(f"reading {topic}: {meta.error.str()}")
        consumer.assign(
            [
                TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING))
                for p in meta.partitions
            ]
        )
        pending = set(meta.partitions)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"reading {topic}: partitions {sorted(pending)} silent")
            for m in consumer.consume(1000, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                    continue
                deadline = time.monotonic() + timeout_s
                yield Seen(
                    m.partition() or 0,
                    m.offset() or 0,
                    m.key(),
                    m.value(),
                    parse_headers(m.headers()),
                )
    except KafkaException as exc:
        raise translate(exc, f"reading {topic}") from exc
    finally:
        consumer.close()


class Publisher:
    """Empties the store's dead-letter outbox into the dead-letter topic: the letters of
    the source partitions its caller owns. Processes sharing a store each publish their
    own, so no letter is ever produced by two at once (both would land).

    A letter handed to the producer stays in its queue until the broker answers or
    ``message.timeout.ms`` passes, even after a flush gave up: it is *in flight*, and
    is not produced again while it is (a broker frozen past the flush deadline would
    otherwise get it twice when it resumes). The producer is idempotent, so its own
    retries inside one delivery never write a letter twice: after a 10 s freeze Kafka's
    controller fences its broker, and a request appended meanwhile is answered "not
    leader" and retried (a producer without idempotence, like the test's source
    publisher, writes such messages twice). One whose delivery failed may still have
    landed (the request was written, its answer lost), so the topic is scanned for it
    before it is produced again."""

    def __init__(self, settings: Settings, spec: DatasourceSpec, outbox: DeadLetterOutbox) -> None:
        self.settings = settings
        self.spec = spec
        self.outbox = outbox
        self.topic = settings.topic(spec.dead_letter_topic)
        self._producer = self._new_producer()
        self._recovered = False
        self.flush_timeout_s = 30.0
        self._in_flight: set[str] = set()
        self._failed = 0  # deliveries reported failed since the last publish returned
        self._fatal = False
        self._acked: list[tuple[str, int, int]] = []

    def _new_producer(self) -> Any:
        # Idempotent: the producer's own retries (a broker stalled mid-request answers
        # a retriable error after it appended) never write a letter twice.
        return producer(self.settings, **{"enable.idempotence": True})

    def _pending(self, owned: Collection[tuple[str, int]]) -> list[DeadLetterRecord]:
        return [d for d in self.outbox.pending(self.spec.name) if (d.topic, d.partition) in owned]

    def taken_over(self) -> None:
        """Partitions were (re)assigned: their previous owner may have crashed between
        producing letters and marking them, so look again before the next publish."""
        self._recovered = False

    def recover(self, owned: Collection[tuple[str, int]]) -> int:
        """Mark pending letters a crashed predecessor (or a delivery reported failed)
        already published."""
        pending = {d.id for d in self._pending(owned)} - self._in_flight
        if not pending:
            return 0
        found = []
        for seen in read_topic(self.settings, self.topic):
            if seen.meta.get("id") in pending:
                found.append((seen.meta["id"], seen.partition, seen.offset))
        if found:
            self.outbox.mark_published(found)
        return len(found)

    def _delivered(self, ident: str, err: Any, msg: Any) -> None:
        self._in_flight.discard(ident)
        if err is None:
            self._acked.append((ident, msg.partition(), msg.offset()))
        else:
            self._failed += 1
            self._recovered = False  # it may have landed: look before producing it again
            self._fatal = self._fatal or bool(err.fatal())

    def _renew_if_fatal(self) -> None:
        """An idempotent producer that hit a fatal error (a sequence gap the broker
        refused) delivers nothing more: start a new one. What the old one sent may have
        landed, so the topic is looked at first."""
        if self._fatal:
            self._producer.purge()
            self._producer.poll(0)
            self._in_flight.clear()
            self._producer = self._new_producer()
            self._fatal, self._recovered = False, False

    def _mark_acked(self) -> None:
        acked, self._acked = self._acked, []
        if acked:
            self.outbox.mark_published(acked)

    def publish(self, owned: Collection[tuple[str, int]]) -> int:
        """Publish the pending letters of the source partitions ``owned``; the number
        acknowledged by this call (letters of earlier calls included)."""
        self._producer.poll(0)  # answers that arrived since the last call
        self._mark_acked()
        self._renew_if_fatal()
        if not self._recovered:
            self.recover(owned)
            self._recovered = True
        pending = [d for d in self._pending(owned) if d.id not in self._in_flight]
        for letter in pending:
            self._in_flight.add(letter.id)
            self._producer.produce(
                self.topic,
                key=letter.key,
                value=letter.value,
                headers=headers(letter),
                on_delivery=functools.partial(self._delivered, letter.id),
            )
        if not self._in_flight:
            return 0
        done = 0
        try:
            flush(self._producer, f"publishing dead letters to {self.topic}", self.flush_timeout_s)
        finally:
            done = len(self._acked)
            self._mark_acked()
        failed, self._failed = self._failed, 0
        if self._in_flight or failed:
            raise BrokerUnavailable(
                f"dead letters to {self.topic}: {len(self._in_flight)} in flight,"
                f" {failed} not delivered"
            )
        return done


def list_dead_letters(
    settings: Settings, spec: DatasourceSpec, limit: int | None = None
) -> list[dict[str, Any]]:
    """Dead letters as JSON-ready dicts. Values that are not UTF-8 (a producer may
    truncate inside a character) come as ``value_base64`` so nothing is lost."""
    out = []
    for seen in read_topic(settings, settings.topic(spec.dead_letter_topic)):
        item = dict(seen.meta)
        item["dlq_partition"], item["dlq_offset"] = seen.partition, seen.offset
        item["key"] = _text(seen.key)
        try:
            item["value"] = seen.value.decode("utf-8") if seen.value is not None else None
        except UnicodeDecodeError:
            item["value"] = None
            item["value_base64"] = base64.b64encode(seen.value or b"").decode()
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def raw_value(letter: dict[str, Any]) -> bytes | None:
    """The original message bytes of a listed dead letter."""
    if "value_base64" in letter:
        return base64.b64decode(letter["value_base64"])
    value = letter.get("value")
    return None if value is None else str(value).encode()


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "replace")


def replay(settings: Settings, spec: DatasourceSpec) -> int:
    """Republish dead letters not yet replayed to their source topic (once each: the
    replay position is a consumer group's committed offset on the dead-letter topic)."""
    topic = settings.topic(spec.dead_letter_topic)
    group = settings.group("dlq-replay", spec.name)
    consumer = Consumer(
        base_config(settings)
        | {
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    prod = producer(settings)
    sent = 0
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        parts = [TopicPartition(topic, p) for p in meta.partitions]
        committed = consumer.committed(parts, timeout=10)
        consumer.assign(
            [
                TopicPartition(
                    topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                )
                for tp in committed
            ]
        )
        positions: dict[int, int] = {}
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.5:
            for m in consumer.consume(1000, 0.2):
                if m.error():
                    continue
                quiet_since = time.monotonic()
                meta_h = parse_headers(m.headers())
                source = meta_h.get("topic") or settings.topic(spec.datasource.topic)
                prod.produce(source, key=m.key(), value=m.value())
                positions[m.partition() or 0] = (m.offset() or 0) + 1
                sent += 1
        flush(prod, "replaying dead letters")
        if positions:
            consumer.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in positions.items()],
                asynchronous=False,
            )
    except KafkaException as exc:
        raise translate(exc, "replaying dead letters") from exc
    finally:
        consumer.close()
    return sent

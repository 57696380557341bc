"""The consume loop: micro-batches from Kafka into one sink, exactly-once in effect.

* One consumer group per sink and datasource, cooperative rebalancing.
* On assignment a partition resumes where the *sink* says (the OLAP sink: the
  catalog's offsets; Kafka's committed offsets are advisory there).
* A batch closes on size or time (defaults keep freshness under a second), is
  decoded and validated, and written; only then do Kafka offsets move.
* Transient failures (broker, store lock, search backend) retry the same batch with
  backoff; nothing is skipped. A fenced commit (another writer owns the partition
  now) drops the batch and re-seeks to what the sink has stored.
* ``until_idle``: stop once assigned and nothing new arrived for that long, and the
  group has been stable for longer than a session timeout — so members of crashed
  processes have been evicted and their partitions handed over. End offsets are not
  consulted (the development broker misreports them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, KafkaException, TopicPartition

from ingest import metrics
from ingest.decode import Decoder, Message
from ingest.kafka import consumer_config, translate
from ingest.sinks import TP, Sink
from storage import OffsetRange
from tally.errors import BrokerError, OffsetMismatch, TallyError
from tally.settings import Settings
from tally.specs import DatasourceSpec

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    sink: str
    datasource: str
    consumed: int = 0
    written: int = 0
    stale: int = 0
    rejected: int = 0
    batches: int = 0
    fenced: int = 0
    error: str | None = None
    assigned: list[int] = field(default_factory=list)


class Runner:
    def __init__(
        self, settings: Settings, spec: DatasourceSpec, sink: Sink, stop: threading.Event
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.sink = sink
        self.stop = stop
        self.topic = settings.topic(spec.datasource.topic)
        self.group = settings.group(sink.name, spec.name)
        self.decoder = Decoder(spec)
        self.labels = {"sink": sink.name, "datasource": spec.name}
        self.positions: dict[int, int | None] = {}  # partition → start of the next batch
        self.ever_assigned = False
        self.last_rebalance = time.monotonic()
        self.report = RunReport(sink.name, spec.name)
        self._consumer: Consumer | None = None

    # --- rebalancing --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps: list[TP] = [(p.topic, p.partition) for p in partitions]
        starts = self.sink.start_positions(tps)
        assign = []
        for topic, part in tps:
            offset = starts.get((topic, part))
            self.positions[part] = offset
            assign.append(
                TopicPartition(topic, part, offset if offset is not None else OFFSET_STORED)
            )
        consumer.incremental_assign(assign)
        self.ever_assigned = True
        self.last_rebalance = time.monotonic()
        self.report.assigned = sorted(self.positions)
        log.info("%s/%s assigned %s", self.sink.name, self.spec.name, sorted(p for _, p in tps))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.last_rebalance = time.monotonic()
        for p in partitions:
            self.positions.pop(p.partition, None)
        self.sink.released([(p.topic, p.partition) for p in partitions])
        self.report.assigned = sorted(self.positions)

    def _reseek(self, consumer: Consumer) -> None:
        """After being fenced: continue from what the sink has actually stored."""
        tps: list[TP] = [(self.topic, p) for p in self.positions]
        starts = self.sink.start_positions(tps)
        for (topic, part), offset in starts.items():
            self.positions[part] = offset
            if offset is not None:
                consumer.seek(TopicPartition(topic, part, offset))

    # --- the loop --------------------------------------------------------------------------

    def run(self, until_idle: float | None = None) -> RunReport:
        consumer = Consumer(consumer_config(self.settings, self.group))
        self._consumer = consumer
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        last_message = time.monotonic()
        try:
            while not self.stop.is_set():
                messages = self._collect(consumer)
                if messages:
                    last_message = time.monotonic()
                    self._process(consumer, messages)
                elif until_idle is not None and self._idle(last_message, until_idle):
                    break
                self._publish_pending()
        except TallyError as exc:
            self.report.error = exc.message
            log.error("%s/%s stopped: %s", self.sink.name, self.spec.name, exc.message)
        finally:
            self._publish_pending()
            consumer.close()
            self.sink.close()
        return self.report

    def _idle(self, last_message: float, until_idle: float) -> bool:
        now = time.monotonic()
        settle = self.settings.ingest.session_timeout_ms / 1000 + 2
        return (
            self.ever_assigned
            and bool(self.positions)
            and now - last_message >= until_idle
            and now - self.last_rebalance >= max(until_idle, settle)
        )

    def _collect(self, consumer: Consumer) -> list[Message]:
        conf = self.settings.ingest
        deadline = time.monotonic() + conf.batch_max_wait_s
        out: list[Message] = []
        while len(out) < conf.batch_max_rows and not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch = consumer.consume(min(10_000, conf.batch_max_rows - len(out)), remaining)
            except KafkaException as exc:
                raise translate(exc, "consuming") from exc
            for m in batch:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise BrokerError(
                            f"topic {self.topic} does not exist (run: tally topics create)"
                        )
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consume: %s", err.str())
                    continue
                part = m.partition()
                if part not in self.positions:
                    continue  # revoked meanwhile
                _ts_type, ts = m.timestamp()
                out.append(Message(self.topic, part or 0, m.offset() or 0, m.key(), m.value(), ts))
            if not batch and not out:
                break
        return out

    def _process(self, consumer: Consumer, messages: list[Message]) -> None:
        ranges: dict[TP, OffsetRange] = {}
        for m in messages:
            known = self.positions.get(m.partition)
            start = known if known is not None else m.offset
            current = ranges.get((m.topic, m.partition))
            ranges[(m.topic, m.partition)] = OffsetRange(
                current.start if current else min(start, m.offset), m.offset + 1
            )
        started = time.perf_counter()
        decoded = self.decoder.decode(messages)
        metrics.consumed.labels(**self.labels).inc(len(messages))
        metrics.rejected.labels(**self.labels).inc(len(decoded.rejected))
        backoff = self.settings.ingest.retry_initial_s
        while True:
            try:
                written, stale = self.sink.write(decoded, ranges)
                break
            except OffsetMismatch as exc:
                self.report.fenced += 1
                metrics.fenced.labels(**self.labels).inc()
                log.warning(
                    "%s/%s fenced, re-seeking: %s", self.sink.name, self.spec.name, exc.message
                )
                self._reseek(consumer)
                return
            except TallyError as exc:
                if not exc.transient or self.stop.is_set():
                    raise
                metrics.retries.labels(**self.labels).inc()
                log.warning(
                    "%s/%s retrying in %.1fs: %s",
                    self.sink.name,
                    self.spec.name,
                    backoff,
                    exc.message,
                )
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.ingest.retry_max_s)
        for (_topic, part), rng in ranges.items():
            if part in self.positions:
                self.positions[part] = rng.end
        self._commit_kafka(consumer, ranges)
        metrics.batch_seconds.labels(**self.labels).observe(time.perf_counter() - started)
        metrics.committed.labels(**self.labels).inc(len(messages))
        metrics.rows_written.labels(**self.labels).inc(written)
        metrics.stale.labels(**self.labels).inc(stale)
        self._record_lag(consumer)
        newest = self.sink.newest_committed()
        if newest is not None:
            age = (datetime.now(UTC) - newest).total_seconds()
            metrics.freshness_seconds.labels(**self.labels).set(age)
        r = self.report
        r.consumed += len(messages)
        r.written += written
        r.stale += stale
        r.rejected += len(decoded.rejected)
        r.batches += 1

    def _record_lag(self, consumer: Consumer) -> None:
        """High watermark minus position, from the client's cached watermarks (no
        round trip). Indicative only: the development broker misreports watermarks."""
        for part, position in self.positions.items():
            if position is None:
                continue
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, part), cached=True
                )
            except KafkaException:
                continue
            if high is not None and high >= 0:
                metrics.lag.labels(**self.labels, partition=str(part)).set(max(0, high - position))

    def _commit_kafka(self, consumer: Consumer, ranges: dict[TP, OffsetRange]) -> None:
        offsets = [
            TopicPartition(t, p, r.end) for (t, p), r in ranges.items() if p in self.positions
        ]
        if not offsets:
            return
        try:
            # The search sink resumes from these, so wait; for OLAP they are advisory.
            if self.sink.uses_kafka_offsets:
                consumer.commit(offsets=offsets, asynchronous=False)
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            err = translate(exc, "committing offsets")
            if self.sink.uses_kafka_offsets:
                log.warning("%s (the batch will be replayed idempotently)", err.message)

    def _publish_pending(self) -> None:
        try:
            published = self.sink.after_write()
            if published:
                metrics.dead_lettered.labels(**self.labels).inc(published)
        except TallyError as exc:
            log.warning("%s/%s: %s (will retry)", self.sink.name, self.spec.name, exc.message)

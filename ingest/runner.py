"""The consume loop: micro-batches from Kafka into one sink, exactly-once in effect.

* One consumer group per sink and datasource, cooperative rebalancing.
* On assignment a partition resumes where the *sink* says (the OLAP sink: the
  catalog's offsets; Kafka's committed offsets are advisory there).
* A batch closes on size or time (defaults keep freshness under a second) — or, while
  the worker is still busy with the previous two, keeps filling up to the size limit —
  is decoded and validated, and written; only then do Kafka offsets move. While a
  worker thread writes one batch, the loop collects the next (one batch in flight,
  order preserved). Every sink call happens on the worker; rebalance callbacks
  first wait for in-flight work, so positions and shards never change under it.
  A revoke also commits what was written, and drops what the open batch holds of
  those partitions: the next owner resumes exactly there, and nothing is written
  by a process that no longer owns the partition.
* A sink that commits offsets itself (the relay: in its Kafka transaction) is bound
  to the consumer and the runner never commits for it.
* Transient failures (broker, store lock, search backend) retry the same batch with
  backoff; nothing is skipped. A fenced commit (another writer owns the partition
  now) drops the batch and re-seeks to what the sink has stored.
* Lanes of one process take turns by their datasources' ``priority``
  (``ingest.priority``): a write waits while a higher-priority lane has a batch
  pending, and a lane's batches stay small while the process serves a higher one.
* ``until_idle``: stop once nothing new arrived for that long, the broker answered
  promptly all along (silence from an unreachable broker is not idleness), and the
  topic is consumed: for *every* partition, not only the assigned ones, where the sink
  would resume (its own stored offsets, else the group's committed ones) is the end.
  That is asked with a fetch at that position (``ingest.kafka.unread``), not with end
  offsets, which the development broker misreports. A timer cannot tell: a crashed
  member keeps its partitions until the broker evicts it, after its own session
  timeout, which need not be ours; until then those positions lag and we wait.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from ingest import metrics
from ingest.decode import Decoder, Message
from ingest.kafka import base_config, consumer_config, topic_id, translate, unread
from ingest.positions import Stop, identity_stop, out_of_range, recreated, reset_hint, summary
from ingest.priority import RANKS, PriorityGate
from ingest.selection import Selector
from ingest.sinks import TP, Sink
from storage import OffsetRange, logmark
from tally.errors import (
    BrokerError,
    BrokerUnavailable,
    OffsetMismatch,
    PositionMismatch,
    TallyError,
)
from tally.settings import Settings
from tally.specs import DatasourceSpec

log = logging.getLogger(__name__)
RECOMMIT_S = 5.0  # how often durable positions are committed again (a lost async commit)


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


@dataclass(frozen=True)
class _Batch:
    """What the loop hands the worker: the messages, the offsets they cover, and when
    it was queued (the priority gate's clock)."""

    messages: list[Message]
    ranges: dict[TP, OffsetRange]
    queued: float


class Runner:
    def __init__(
        self,
        settings: Settings,
        spec: DatasourceSpec,
        sink: Sink,
        stop: threading.Event,
        gate: PriorityGate | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.sink = sink
        self.stop = stop
        self.topic = settings.topic(spec.datasource.topic)
        self.group = settings.group(sink.name, spec.name)
        self.decoder = Decoder(spec)
        self.selector = Selector(spec, sink.name)
        self.labels = {"sink": sink.name, "datasource": spec.name}
        # Alone in its process (no gate given), a lane never waits and is never capped.
        self.gate = gate or PriorityGate(settings.ingest.batch_max_rows)
        self.rank = RANKS[spec.datasource.priority]
        self.lane = f"{sink.name}/{spec.name}"
        self.positions: dict[int, int | None] = {}  # partition → start of the next batch
        self._last_contact: float | None = None  # last prompt answer or message from the broker
        self._healthy_since: float | None = None  # broker answering promptly since then
        self._next_probe = 0.0  # when to ask again whether the topic is consumed
        self._unconsumed: set[int] | None = None  # partitions the last probe found behind
        self.report = RunReport(sink.name, spec.name)
        self._consumer: Consumer | None = None
        self._work: queue.Queue[_Batch | None] = queue.Queue(1)
        self._fenced = threading.Event()
        self._failure: TallyError | None = None
        self._done_lock = threading.Lock()
        self._done: dict[TP, int] = {}  # written but not yet committed to Kafka
        self._durable: dict[int, int] = {}  # partition → end of what the sink has made durable
        self._next_recommit = 0.0
        self._lag_at = 0.0
        self._revoked: set[int] = set()  # partitions revoked while a batch was filling
        self._closing = False
        self._admin = AdminClient(base_config(settings))
        self._log: str | None = None  # the topic's id as last seen (KIP-516)
        self._stopped: dict[int, Stop] = {}  # partitions whose position is not of the log
        self._hint = reset_hint(spec.name, sink.name)

    # --- rebalancing --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._closing:
            # An assignment served by close(): it is revoked at once, so asking the sink
            # where to resume is wasted (the relay's offsets fetch cannot even be answered
            # by a closing consumer).
            consumer.incremental_assign(partitions)
            return
        self._work.join()
        tps: list[TP] = [(p.topic, p.partition) for p in partitions]
        starts = self.sink.start_positions(tps)
        self._watch_log(consumer)  # the topic's id now (and a change since the last)
        assign, stops = [], []
        for topic, part in tps:
            stored = starts.get((topic, part))
            stop = identity_stop(topic, part, stored, self._log, self._hint)
            if stop is not None:
                stops.append(stop)
            elif stored is not None:
                self.positions[part] = stored.offset
                self._durable[part] = stored.offset
            else:
                self.positions[part] = None  # nothing stored: from the log's beginning
            offset = stored.offset if stored is not None and stop is None else OFFSET_BEGINNING
            assign.append(TopicPartition(topic, part, offset))
        consumer.incremental_assign(assign)
        for stop in stops:
            self._stop_partition(consumer, stop)
        self.report.assigned = sorted(self.positions)
        log.info("%s/%s assigned %s", self.sink.name, self.spec.name, sorted(p for _, p in tps))

    def _watch_log(self, consumer: Consumer) -> None:
        """Learn the topic's id; if it changed since this sink last looked, everything
        it holds was read from the old log: those partitions stop."""
        old = self._log
        if self._refresh_log() and old is not None and self._log is not None:
            for part in sorted(self.positions):
                self._stop_partition(
                    consumer, recreated(self.topic, part, old, self._log, self._hint)
                )

    def _refresh_log(self) -> bool:
        """Ask the topic's id; True when it changed from a known one."""
        try:
            now = topic_id(self._admin, self.topic)
        except TallyError as exc:
            # Unknown for now (the check is repeated every few seconds): the range check
            # of every fetch still applies meanwhile.
            log.warning("%s: topic id unknown for now: %s", self.lane, exc.message)
            return False
        old, self._log = self._log, now
        return old is not None and now is not None and old != now

    def _stop_partition(self, consumer: Consumer, stop: Stop) -> None:
        """Read nothing more of the partition and never commit for it, until an
        operator decides; one error line and the metric say why."""
        part = stop.partition
        self.positions.pop(part, None)
        self._stopped[part] = stop
        with self._done_lock:
            self._durable.pop(part, None)
            self._done.pop((self.topic, part), None)
        with contextlib.suppress(KafkaException):
            consumer.pause([TopicPartition(self.topic, part)])
        metrics.stopped_partitions.labels(**self.labels, partition=str(part), reason=stop.kind).set(
            1
        )
        log.error("%s: %s", self.lane, stop.message)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._work.join()  # finish what was handed to the worker before letting go
        if not self._closing and self._refresh_log():
            # A revoke is how the client meets a recreated topic: positions of the old
            # log must not be committed as the new one's (nor paused: they are going).
            with self._done_lock:
                self._done.clear()
        self._commit_kafka(consumer)  # while still ours: the next owner resumes after it
        for p in partitions:
            self.positions.pop(p.partition, None)
            self._revoked.add(p.partition)
            with contextlib.suppress(KeyError):  # another member reports it now
                metrics.lag.remove(self.sink.name, self.spec.name, str(p.partition))
            # Its next owner checks it for itself (kept when closing: the report says it).
            stop = None if self._closing else self._stopped.pop(p.partition, None)
            if stop is not None:
                with contextlib.suppress(KeyError):
                    metrics.stopped_partitions.remove(
                        self.sink.name, self.spec.name, str(p.partition), stop.kind
                    )
        with self._done_lock:
            for p in partitions:
                self._durable.pop(p.partition, None)
        self.sink.released([(p.topic, p.partition) for p in partitions])
        self.report.assigned = sorted(self.positions)
        # Logged once let go (after the in-flight batch), the counterpart of "assigned":
        # together they show how long a partition went without an owner.
        log.info(
            "%s/%s revoked %s",
            self.sink.name,
            self.spec.name,
            sorted(p.partition for p in partitions),
        )

    def _reseek(self, consumer: Consumer) -> None:
        """After being fenced: continue from what the sink has actually stored."""
        tps: list[TP] = [(self.topic, p) for p in self.positions]
        starts = self.sink.start_positions(tps)
        for (topic, part), stored in starts.items():
            self.positions[part] = None if stored is None else stored.offset
            if stored is not None:
                consumer.seek(TopicPartition(topic, part, stored.offset))

    # --- the loop --------------------------------------------------------------------------

    def run(self, until_idle: float | None = None) -> RunReport:
        # A position the log does not hold (before its start: retention; past its end:
        # another log) is reported, never moved silently (``ingest.positions``): every
        # partition is assigned at an explicit position, the beginning when none is stored.
        consumer = Consumer(
            consumer_config(self.settings, self.group) | {"auto.offset.reset": "error"}
        )
        self._consumer = consumer
        worker = threading.Thread(target=self._worker, name=f"{self.group}-writer", daemon=True)
        worker.start()
        last_message = time.monotonic()
        self.gate.join(self.rank)
        try:
            self.sink.bind(consumer)
            consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not self.stop.is_set():
                if self._fenced.is_set():
                    self._work.join()  # queued batches behind a fenced one are dropped
                    self._reseek(consumer)
                    self._fenced.clear()
                messages = self._collect(consumer)
                self._commit_kafka(consumer)
                if time.monotonic() >= self._next_recommit:
                    self._next_recommit = time.monotonic() + RECOMMIT_S
                    self._watch_log(consumer)
                    self._recommit(consumer)
                self._record_lag(consumer)
                if messages:
                    last_message = time.monotonic()
                    self._last_contact = last_message
                    if self._healthy_since is None:  # messages are the broker answering
                        self._healthy_since = last_message
                    self._hand_over(messages, self._ranges(messages))
                elif until_idle is not None:
                    self._check_health(consumer)
                    if self._idle(consumer, last_message, until_idle):
                        log.info(
                            "%s/%s idle for %.1fs and the topic consumed, stopping",
                            self.sink.name,
                            self.spec.name,
                            until_idle,
                        )
                        break
        except TallyError as exc:
            self._failure = self._failure or exc
        finally:
            self.gate.leave(self.rank)
            self._work.put(None)
            worker.join()
            self._commit_kafka(consumer)
            self._closing = True
            consumer.close()
            self.sink.close()
        if self._failure is None and self._stopped:
            self._failure = PositionMismatch(summary(list(self._stopped.values())))
        if self._failure is not None:
            self.report.error = self._failure.message
            log.error("%s/%s stopped: %s", self.sink.name, self.spec.name, self._failure.message)
        return self.report

    def _hand_over(self, messages: list[Message], ranges: dict[TP, OffsetRange]) -> None:
        """Queue a batch for the worker; keep the stop flag responsive while waiting.
        From now on the batch is pending: lower-priority lanes wait for it."""
        item = _Batch(messages, ranges, self.gate.queued(self.rank))
        while not self.stop.is_set():
            try:
                self._work.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._consumer is not None:
                    # The writer is stuck and nothing is fetched meanwhile, so the
                    # cached ends stop moving: ask the broker, or lag would stay flat.
                    self._record_lag(self._consumer, fresh=True)
                continue
        self.gate.dropped(self.rank)

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            try:
                if item is None:
                    self._publish_pending()
                    return
                if self._fenced.is_set() or self._failure is not None:
                    self.gate.dropped(self.rank)
                else:
                    rows = len(item.messages)
                    with self.gate.turn(self.lane, self.rank, rows, item.queued, self.stop):
                        self._process(item.messages, item.ranges)
                    self._publish_pending()
            except TallyError as exc:
                self._failure = exc
                self.stop.set()
            except Exception as exc:  # a bug: stop rather than skip data
                self._failure = TallyError(f"unexpected {type(exc).__name__}: {exc}")
                log.exception("%s/%s writer crashed", self.sink.name, self.spec.name)
                self.stop.set()
            finally:
                self._work.task_done()

    def _ranges(self, messages: list[Message]) -> dict[TP, OffsetRange]:
        """Offsets the batch covers, continuing from where the previous batch ended."""
        ranges: dict[TP, OffsetRange] = {}
        for m in messages:
            known = self.positions.get(m.partition)
            start = known if known is not None else m.offset
            current = ranges.get((m.topic, m.partition))
            ranges[(m.topic, m.partition)] = OffsetRange(
                current.start if current else min(start, m.offset), m.offset + 1, self._log
            )
        for (_topic, part), rng in ranges.items():
            self.positions[part] = rng.end
        return ranges

    def _idle(self, consumer: Consumer, last_message: float, until_idle: float) -> bool:
        """Quiet and healthy for ``until_idle``, then (at most once a second, with no
        batch in flight) the topic is consumed."""
        now = time.monotonic()
        if (
            self._healthy_since is None
            or now - max(last_message, self._healthy_since) < until_idle
            or now < self._next_probe
            or self._work.unfinished_tasks  # a batch is still being written
        ):
            return False
        self._next_probe = now + 1.0
        self._recommit(consumer)
        return self._consumed(consumer)

    def _recommit(self, consumer: Consumer) -> None:
        """Commit what was written once more (every ``RECOMMIT_S`` and before an idle
        probe): an asynchronous commit that failed (in a rebalance, say) is not
        retried, and the search sink resumes from these; a partition whose last batch's
        commit was lost would otherwise show that lag until new messages came. (A sink
        that commits offsets itself has nothing to repeat: what it committed is exact.)"""
        with self._done_lock:
            for part, end in self._durable.items():
                tp = (self.topic, part)
                self._done[tp] = max(end, self._done.get(tp, 0))
        self._commit_kafka(consumer)

    def _consumed(self, consumer: Consumer) -> bool:
        """Whether a consumer resuming every partition where this sink would (as
        ``_on_assign`` does; stopped ones aside) finds nothing left; a probe that
        gets no answer restarts the quiet period, like a failed health check."""
        behind: set[int] | None = None
        try:
            behind = unread(self.settings, self.topic, self._resume_positions(consumer))
        except KafkaException as exc:
            reason = translate(exc, f"probing {self.topic}").message
        except TallyError as exc:
            if not exc.transient:
                raise
            reason = exc.message
        if behind is None:
            log.warning("%s/%s: not idle: %s", self.sink.name, self.spec.name, reason)
            self._healthy_since = self._last_contact = None
            return False
        if behind and behind != self._unconsumed:
            log.info(
                "%s/%s: quiet, but partitions %s are not consumed yet (another member"
                " holds them, or a crashed one until the broker evicts it), waiting",
                self.sink.name,
                self.spec.name,
                sorted(behind),
            )
        self._unconsumed = behind
        return not behind

    def _resume_positions(self, consumer: Consumer) -> dict[int, int]:
        """Every partition of the topic → where this sink would resume it: the sink's
        own position, else the group's committed offset, else the beginning."""
        meta = consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise BrokerUnavailable(f"no partitions known for {self.topic}")
        # A stopped partition is not behind: it waits for an operator (the run's report
        # says so), and its position is not of this log.
        tps: list[TP] = [(self.topic, p) for p in sorted(meta.partitions) if p not in self._stopped]
        starts = self.sink.resume_positions(tps)  # asks; taking over is for assignments
        return {
            p: OFFSET_BEGINNING if start is None else start.offset
            for (_t, p), start in starts.items()
        }

    def _check_health(self, consumer: Consumer) -> None:
        """Probe the broker about once a second while quiet. Silence only counts as
        idleness while the broker has answered promptly all along: a failed probe,
        or a gap between successful ones (we were blocked by an outage), restarts it."""
        now = time.monotonic()
        if self._last_contact is not None and now - self._last_contact < 1.0:
            return
        if self._broker_answers(consumer):
            after = time.monotonic()
            gap = self._last_contact is None or now - self._last_contact > 2.5
            if gap or self._healthy_since is None:  # (the first contact may be a message)
                self._healthy_since = after
            self._last_contact = after
        else:
            self._healthy_since = None
            self._last_contact = None

    def _broker_answers(self, consumer: Consumer) -> bool:
        """A prompt metadata round trip: the quiet period was a healthy one. A probe that
        fails, or that only succeeds late (it waited out an outage), restarts the clock."""
        started = time.monotonic()
        try:
            consumer.list_topics(self.topic, timeout=2)
        except KafkaException:
            log.warning("%s/%s: broker unreachable, not idle", self.sink.name, self.spec.name)
            return False
        if time.monotonic() - started > 0.5:
            log.warning(
                "%s/%s: broker slow to answer, not idle yet", self.sink.name, self.spec.name
            )
            return False
        return True

    def _collect(self, consumer: Consumer) -> list[Message]:
        conf = self.settings.ingest
        deadline = time.monotonic() + self.sink.linger_s
        out: list[Message] = []
        self._revoked.clear()
        while not self.stop.is_set():
            limit = self.gate.batch_rows(self.rank, conf.batch_max_rows)
            if len(out) >= limit:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not (out and self._work.full()):
                    break
                # The worker is busy and a batch already waits for it: handing this one
                # over would only block, so keep filling it. Batches grow with the
                # backlog (fewer, larger commits) and stay small when caught up. The
                # main loop is not reached meanwhile: its lag would stay flat.
                remaining = 0.02
                self._record_lag(consumer)
            try:
                batch = consumer.consume(min(10_000, limit - len(out)), remaining)
            except KafkaException as exc:
                raise translate(exc, "consuming") from exc
            if self._revoked:
                # Revoked during that call: what this batch already holds of those
                # partitions is no longer ours to write — the next owner resumes from
                # the store, and a late write would fence it (or hold its search shard).
                out = [m for m in out if m.partition not in self._revoked]
                self._revoked.clear()
            for m in batch:
                err = m.error()
                if err is not None:
                    refused = m.partition()
                    if err.code() == KafkaError._AUTO_OFFSET_RESET and refused is not None:
                        out = [kept for kept in out if kept.partition != refused]
                        if refused in self.positions:
                            self._stop_partition(consumer, self._out_of_range(consumer, refused))
                    elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        self._topic_missing(consumer)
                    elif err.code() != KafkaError._PARTITION_EOF:
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

    def _out_of_range(self, consumer: Consumer, part: int) -> Stop:
        """What the broker's refusal of this partition's position means, from its
        watermarks now."""
        position = self.positions.get(part)
        low: int | None
        high: int | None
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, part), timeout=5.0
            )
        except KafkaException:
            low = high = None
        return out_of_range(self.topic, part, position, low, high, self._hint)

    def _topic_missing(self, consumer: Consumer) -> None:
        """The topic is unknown to the broker: gone (stop, with the command that makes
        it), or deleted and already created again (its partitions come back through a
        rebalance, where the positions are checked)."""
        try:
            meta = consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        except KafkaException as exc:
            raise translate(exc, f"describing {self.topic}") from exc
        if meta is None or meta.error is not None:
            raise BrokerError(f"topic {self.topic} does not exist (run: tally topics create)")
        log.warning("%s: %s was unknown for a moment (recreated?)", self.lane, self.topic)

    def _process(self, messages: list[Message], ranges: dict[TP, OffsetRange]) -> None:
        started = time.perf_counter()
        selected = self.selector.apply(self.decoder.decode(messages))
        decoded = selected.decoded
        metrics.consumed.labels(**self.labels).inc(len(messages))
        metrics.rejected.labels(**self.labels).inc(len(decoded.rejected))
        for outcome in ("kept", "out_of_sample", "filtered"):
            count = getattr(selected, outcome)
            metrics.selected.labels(**self.labels, outcome=outcome).inc(count)
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
                self._fenced.set()
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
        with self._done_lock:
            for tp, rng in ranges.items():
                self._done[tp] = max(rng.end, self._done.get(tp, 0))
                self._durable[tp[1]] = max(rng.end, self._durable.get(tp[1], 0))
        metrics.batch_seconds.labels(**self.labels).observe(time.perf_counter() - started)
        metrics.committed.labels(**self.labels).inc(len(messages))
        metrics.rows_written.labels(**self.labels).inc(written)
        metrics.stale.labels(**self.labels).inc(stale)
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

    def _record_lag(self, consumer: Consumer, *, fresh: bool = False) -> None:
        """Log end minus what the sink has made durable, per partition, at most twice a
        second, from the client's cached watermarks (no round trip: fetch responses,
        empty ones too, carry them), or asked of the broker when ``fresh`` (nothing is
        being fetched: the writer is stuck). A partition whose durable position is not known
        yet (it resumes from Kafka's committed offset) shows once its first batch is
        written. On the development broker the ends are wrong (it misreports them)."""
        now = time.monotonic()
        if now - self._lag_at < 0.5:
            return
        self._lag_at = now
        for part, durable in list(self._durable.items()):
            try:
                # Asked of the broker, a loaded one may take over half a second; a
                # round gives up at the first partition that does not answer in 2 s.
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, part),
                    timeout=2.0 if fresh else 0.5,
                    cached=not fresh,
                )
            except KafkaException:
                if fresh:  # the broker does not answer: the next round asks again
                    return
                continue
            if high is not None and high >= 0:
                metrics.lag.labels(**self.labels, partition=str(part)).set(max(0, high - durable))

    def _commit_kafka(self, consumer: Consumer) -> None:
        """Move Kafka's offsets past what the worker has durably written. Asynchronous:
        the OLAP sink resumes from the catalog (these are advisory, for lag), and the
        search sink's upserts are idempotent, so a lost commit only means a replay."""
        with self._done_lock:
            done, self._done = self._done, {}
        if self.sink.commits_offsets_itself:
            return  # committed with the sink's output; a second, async commit would race it
        note = logmark.encode(self._log)
        offsets = [
            TopicPartition(t, p, end, metadata=note)
            for (t, p), end in done.items()
            if p in self.positions
        ]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            err = translate(exc, "committing offsets")
            log.warning("%s (a replay will be idempotent)", err.message)

    def _publish_pending(self) -> None:
        try:
            published = self.sink.after_write()
            if published:
                metrics.dead_lettered.labels(**self.labels).inc(published)
        except TallyError as exc:
            log.warning("%s/%s: %s (will retry)", self.sink.name, self.spec.name, exc.message)

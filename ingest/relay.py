"""The OLAP sink of engines that ingest from Kafka themselves: a transactional relay.

Druid (``Capabilities.ingests_from_kafka``) loads the base datasource with its own
Kafka supervisor, exactly-once by its metadata store. It must not read the events
topic: its parse errors are only counted, and an event that parses but breaks the
spec (a float amount, an unknown event type) would be stored. So the spec's decoder
runs here, ahead of it (ADR 0004), and each batch becomes ONE Kafka transaction
(consume-transform-produce, KIP-447):

* every valid row, as flat typed JSON (``storage.refined``), to the refined topic, on
  its source message's partition number, keyed by the datasource key;
* every rejected message to the dead-letter topic, encoded exactly as the outbox
  publisher does (``ingest.deadletter``);
* with rollups, each rollup's retraction deltas to its deltas topic and every
  accepted key's new state to the state changelog (``storage.keystate``, ADR 0006);
* the group's offsets past the batch (``send_offsets_to_transaction`` with the
  consumer's group metadata), then commit.

Offsets, rows and dead letters become visible together or not at all (read_committed),
so a crash at any point leaves either the whole batch or nothing. The coordinator
accepts the offsets only from the group's current generation: a zombie that lost its
partitions in a rebalance is fenced there, aborts, and re-seeks (``OffsetMismatch``,
the runner's fenced path). The runner never commits offsets for this sink.

transactional.id is ``<group>.relay.<host>.<pid>``: unique among live processes,
which is all KIP-447 needs (fencing is by group generation, not by id). Where the
host name and pid survive a restart (a container's pid 1), the restarted process
takes the same id and init_transactions aborts its predecessor's open transaction at
once; otherwise that transaction blocks its partitions until ``ingest.
transaction_timeout_s`` (the offsets fetch waits for it), then the coordinator aborts it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ingest.deadletter import record
from ingest.decode import Decoded
from ingest.kafka import (
    base_config,
    derived_topics,
    ensure_like,
    partition_count,
    producer,
    translate,
)
from storage import OffsetRange, StoredPosition, logmark
from storage.deadletters import headers
from storage.keystate import KeyStates, encode_state, restore
from storage.refined import (
    OFFSET_HEADER,
    RowEncoder,
    encode_deltas,
    refined_topic,
    rollup_topic,
    state_topic,
)
from tally.errors import BrokerError, BrokerUnavailable, OffsetMismatch, TallyError
from tally.settings import Settings
from tally.specs import DatasourceSpec

log = logging.getLogger(__name__)
TP = tuple[str, int]
T = TypeVar("T")

# The coordinator refused the batch's offsets or the producer's epoch: another
# member (or producer) owns this work now — or may once the group's rebalance is done
# (REBALANCE_IN_PROGRESS). Retrying such a batch cannot succeed: its group metadata
# is refreshed only by the rebalance callbacks, which wait for this very batch (the
# consumer goes unpolled until max.poll.interval.ms drops the member). So it is
# aborted and re-sought after the rebalance, from the committed offsets.
_FENCED = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
}


class KafkaRelay:
    name = "olap"  # it is the OLAP sink (its group, its dead letters), on such engines
    uses_kafka_offsets = True
    commits_offsets_itself = True

    def __init__(self, settings: Settings, spec: DatasourceSpec) -> None:
        self.settings = settings
        self.spec = spec
        self.linger_s = settings.ingest.batch_max_wait_s
        self.source = settings.topic(spec.datasource.topic)
        self.topic = refined_topic(settings, spec)
        self.dead_letter_topic = settings.topic(spec.dead_letter_topic)
        group = settings.group(self.name, spec.name)
        self.transactional_id = f"{group}.relay.{socket.gethostname()}.{os.getpid()}"
        self._timeout_s = settings.ingest.transaction_timeout_s
        self._encoder = RowEncoder(spec)
        # Rollups: the per-key state deltas are planned against, and where it goes.
        self._states = KeyStates(spec) if spec.rollups else None
        self._state_topic = state_topic(settings, spec)
        self._rollup_topics = {r.name: rollup_topic(settings, spec, r) for r in spec.rollups}
        self._consumer: Consumer | None = None
        # The group generation the offsets are committed under, read on the runner's
        # thread at each rebalance (start_positions, released): the client blocks a
        # call from another thread while the loop consumes. A generation that moved on
        # meanwhile is exactly what the coordinator fences.
        self._group_metadata: Any = None
        self._producer: Producer | None = None
        self._letters = 0  # dead letters committed since after_write last asked
        self._newest: datetime | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def bind(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._group_metadata = consumer.consumer_group_metadata()
        for target, config in derived_topics(self.settings, self.spec).items():
            ensure_like(self.settings, self.source, target, config)
        if partition_count(self.settings, self.dead_letter_topic) is None:
            raise BrokerError(
                f"topic {self.dead_letter_topic} does not exist (run: tally topics create)"
            )
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        timeout_ms = int(self._timeout_s * 1000)
        prod = producer(
            self.settings,
            **{
                "transactional.id": self.transactional_id,
                "enable.idempotence": True,
                "transaction.timeout.ms": timeout_ms,
                "message.timeout.ms": timeout_ms,  # librdkafka: must not exceed the above
                "linger.ms": 5,  # commit_transaction flushes anyway; keep batches prompt
                "queue.buffering.max.messages": 1_000_000,
            },
        )
        try:
            self._retrying(prod.init_transactions, self._timeout_s * 3)
        except KafkaException as exc:
            raise translate(exc, f"initialising transactions ({self.transactional_id})") from exc
        return prod

    def _drop_producer(self) -> None:
        """A producer that is fenced, or whose transaction's outcome is unknown, is
        useless. The next write makes a new one with the same id, which makes the
        coordinator settle the old transaction (commit it if it was being committed,
        else abort) before answering; meanwhile the stable offsets fetch of the
        re-seek waits for the same settlement, so it reads the truth either way."""
        old, self._producer = self._producer, None
        if old is not None:
            try:
                old.close()  # aborts an open transaction where it still can
            except (KafkaException, RuntimeError):
                log.debug("closing a dropped producer", exc_info=True)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
            self._producer.close()
            self._producer = None

    # --- positions -----------------------------------------------------------------------

    def start_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """Taking ``partitions`` over: where to resume them, and their key state as of
        those offsets (committed in the same transactions)."""
        self._group_metadata = self._bound().consumer_group_metadata()
        out = self.resume_positions(partitions)
        if self._states is not None:
            parts = [p for _, p in partitions]
            restore(self._states, base_config(self.settings), self._state_topic, parts)
        return out

    def resume_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """The group's committed offsets: exactly what the transactions committed.
        Fetched as read_committed (stable offsets: a pending transaction of a crashed
        member is waited out, never read half-way). A partition without one starts at
        its beginning — said explicitly, so a re-seek after a fence rewinds it too.
        Only asks: the runner's idle probe asks for partitions it does not own."""
        consumer = self._bound()
        if not partitions:
            return {}
        wanted = [TopicPartition(t, p) for t, p in partitions]
        deadline = time.monotonic() + self._timeout_s * 3 + 10
        while True:
            try:
                got = consumer.committed(wanted, timeout=5)
                if all(tp.error is None for tp in got):
                    break
                reason = "; ".join(str(tp.error) for tp in got if tp.error is not None)
            except KafkaException as exc:
                reason = translate(exc, "fetching committed offsets").message
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"{self.source}: committed offsets unavailable: {reason}")
            log.info("%s: committed offsets not stable yet (%s), waiting", self.source, reason)
            time.sleep(0.2)
        out: dict[TP, StoredPosition | None] = {}
        for tp in got:
            position = logmark.decode(tp.offset, tp.metadata)
            if position is None:
                try:
                    offset, _high = consumer.get_watermark_offsets(
                        TopicPartition(tp.topic, tp.partition), timeout=10
                    )
                except KafkaException as exc:
                    raise translate(exc, f"reading the start of {tp.topic}") from exc
                position = StoredPosition(offset)
            out[(tp.topic, tp.partition)] = position
        return out

    def released(self, partitions: list[TP]) -> None:
        self._group_metadata = self._bound().consumer_group_metadata()
        if self._states is not None:
            self._states.drop(p for _, p in partitions)

    # --- the transaction -----------------------------------------------------------------

    def write(self, decoded: Decoded, ranges: Mapping[TP, OffsetRange]) -> tuple[int, int]:
        if self._producer is None:  # dropped after a failure (see _drop_producer)
            self._producer = self._new_producer()
        prod = self._producer
        keys, values = self._encoder.encode(decoded.table)
        letters = [record(r, self.spec.name, self.name) for r in decoded.rejected]
        offsets = [
            TopicPartition(t, p, r.end, metadata=logmark.encode(r.log))
            for (t, p), r in ranges.items()
        ]
        plan = (
            None if self._states is None else self._states.plan(decoded.table, decoded.partitions)
        )
        try:
            prod.begin_transaction()
            for key, value, part, offset in zip(
                keys, values, decoded.partitions, decoded.offsets, strict=True
            ):
                self._produce(
                    prod, self.topic, key, value, part, [(OFFSET_HEADER, str(offset).encode())]
                )
            for letter in letters:
                self._produce(
                    prod, self.dead_letter_topic, letter.key, letter.value, None, headers(letter)
                )
            if plan is not None:
                for rollup in self.spec.rollups:
                    if (deltas := plan.deltas.get(rollup.name)) is not None:
                        topic = self._rollup_topics[rollup.name]
                        for value in encode_deltas(self.spec, rollup, deltas):
                            self._produce(prod, topic, None, value, None, [])
                for part, entity, state in plan.states:
                    self._produce(
                        prod, self._state_topic, entity.encode(), encode_state(state), part, []
                    )
            group = self._group_metadata
            self._retrying(
                lambda: prod.send_offsets_to_transaction(offsets, group, self._timeout_s),
                self._timeout_s,
            )
            self._retrying(lambda: prod.commit_transaction(self._timeout_s), self._timeout_s)
        except KafkaException as exc:
            raise self._failed(exc) from exc
        if plan is not None and self._states is not None:
            self._states.apply(plan)  # committed: the state the changelog now holds
        self._letters += len(letters)
        newest = _newest(decoded.table, self.spec.datasource.time)
        if newest is not None and (self._newest is None or newest > self._newest):
            self._newest = newest
        return len(values), 0

    def _produce(
        self,
        prod: Producer,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        hdrs: list[tuple[str, str | bytes | None]],
    ) -> None:
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                prod.produce(topic, value=value, key=key, headers=hdrs, **extra)
                return
            except BufferError:  # the local queue is full: let deliveries drain
                prod.poll(0.05)

    def _failed(self, exc: KafkaException) -> TallyError:
        """Abort and say what the runner should do: retry the batch (transient) or drop
        it and re-seek to the committed offsets (``OffsetMismatch``)."""
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        what = f"{self.source} → {self.topic}: transaction failed: {text}"
        if isinstance(err, KafkaError) and err.fatal():
            log.warning("%s; a new producer takes over", what)
            self._drop_producer()
            return OffsetMismatch(f"{what} (fatal: re-seeking to the committed offsets)")
        assert self._producer is not None
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException as abort_exc:
            # Whether the batch committed is unknown: the committed offsets (read
            # stable) say where to go on.
            log.warning("%s; abort failed too (%s), a new producer takes over", what, abort_exc)
            self._drop_producer()
            return OffsetMismatch(f"{what} (outcome unknown: re-seeking)")
        if isinstance(err, KafkaError) and err.code() in _FENCED:
            return OffsetMismatch(f"{what} (aborted: another member owns the partitions)")
        return BrokerUnavailable(f"{what} (aborted; the batch is retried)")

    @staticmethod
    def _retrying(call: Callable[[], T], budget_s: float) -> T:
        """A transactional call retried while librdkafka says retrying it is right."""
        deadline = time.monotonic() + budget_s
        while True:
            try:
                return call()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if (
                    not isinstance(err, KafkaError)
                    or not err.retriable()
                    or err.txn_requires_abort()
                    or err.fatal()
                    or time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.1)

    def _bound(self) -> Consumer:
        if self._consumer is None:
            raise TallyError("the relay sink was used before bind(consumer)")
        return self._consumer

    # --- follow-ups ----------------------------------------------------------------------

    def after_write(self) -> int:
        """Dead letters left with their transaction: report how many, publish nothing."""
        letters, self._letters = self._letters, 0
        return letters

    def newest_committed(self) -> datetime | None:
        return self._newest


def _newest(table: pa.Table, column: str) -> datetime | None:
    if not table.num_rows:
        return None
    value = pc.max(table.column(column)).as_py()
    return value.astimezone(UTC) if isinstance(value, datetime) else None

"""The Druid backend's writer side: a commit is the relay's write path, one Kafka
transaction to the refined topic that Druid's supervisor ingests (ADR 0004).

``commit`` encodes the rows in the refined format (``storage.refined``), produces
them keyed by the datasource key (the default partitioner keeps a key on one
partition, so per-key order holds) and the batch's dead letters to the dead-letter
topic, and, given ``offsets``, commits them for the OLAP sink's group
(``tally.olap.<datasource>``, the relay's) in the same transaction. So rows, letters
and offsets are visible together or not at all to read_committed readers, Druid's
supervisor among them. What the contract asks and Druid cannot give is a capability
(``storage.druid.capabilities``), each with its reason:

* ``visible_on_commit`` false: the rows are queryable once the supervisor's task has
  read them, seconds later;
* ``transactional_offsets`` false: a direct commit has no group generation, so its
  offsets are committed unfenced (Kafka accepts a generation -1 commit for a group
  without members) and a start that differs from the stored one is not refused;
  ``stored_offsets`` is what the group holds;
* ``dead_letter_outbox`` false: letters are in the topic when the commit returns,
  ``outbox.pending`` is always empty;
* ``repair`` false: ``repair`` raises ``StoreError``.

Compaction is Tally's (``manual_compaction``): the compactor, the partition
statistics and the segment list are ``storage.druid.compactor``'s, per Druid time
chunk.

The supervisor must be running (``tally druid apply``, as at deployment); the store
does not submit it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from storage import logmark
from storage.deadletters import headers
from storage.druid.capabilities import CAPABILITIES
from storage.druid.compactor import DruidCompactor
from storage.druid.repair import rebuild_rollup, repair_rows
from storage.enginefiles import EngineKeepsFiles
from storage.keystate import KeyStates, encode_state, restore
from storage.protocol import (
    CommitResult,
    DeadLetterRecord,
    OffsetRange,
    PartitionStats,
    RebuildReport,
    RepairResult,
    SegmentInfo,
    StoredPosition,
)
from storage.protocol import (
    TopicPartition as TP,
)
from storage.refined import RowEncoder, encode_deltas, refined_topic, rollup_topic, state_topic
from storage.schema import row_schema, rows_to_table
from tally.errors import BrokerError, BrokerUnavailable, StoreError
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry

SINK = "olap"  # the sink whose group holds the offsets: the relay's


class _TopicOutbox:
    """Dead letters are produced in the commit's transaction: never pending."""

    def pending(self, datasource: str) -> list[DeadLetterRecord]:
        return []

    def mark_published(self, published: Sequence[tuple[str, int, int]]) -> None:
        return None


class DruidStore(EngineKeepsFiles):
    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._timeout_s = settings.ingest.transaction_timeout_s
        self._producer: Producer | None = None
        self._consumers: dict[str, Consumer] = {}
        self._encoders: dict[str, RowEncoder] = {}
        self._states: dict[str, tuple[KeyStates, int]] = {}  # spec → its state, partitions
        self._compactor: DruidCompactor | None = None
        self._outbox = _TopicOutbox()

    # --- Kafka clients -------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        # Errors only: the client retries a coordinator that is moving or loading itself,
        # and says so at warning level on stderr (as ingest.kafka.base_config keeps quiet).
        conf: dict[str, Any] = {"bootstrap.servers": self.settings.kafka_bootstrap, "log_level": 3}
        if self.settings.kafka_password is not None:
            conf |= {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanisms": "PLAIN",
                "sasl.username": self.settings.kafka_user or "tally",
                "sasl.password": self.settings.kafka_password.get_secret_value(),
            }
        return conf

    def _producer_for_commit(self) -> Producer:
        if self._producer is None:
            host, pid, tag = socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8]
            namespace = self.settings.topic_namespace
            timeout_ms = int(self._timeout_s * 1000)
            prod = Producer(
                self._config()
                | {
                    "transactional.id": f"{namespace}tally.store.{host}.{pid}.{tag}",
                    "enable.idempotence": True,
                    "transaction.timeout.ms": timeout_ms,
                    "message.timeout.ms": timeout_ms,
                    "linger.ms": 5,
                }
            )
            try:
                prod.init_transactions(self._timeout_s * 3)
            except KafkaException as exc:
                raise _translate(exc, "initialising transactions") from exc
            self._producer = prod
        return self._producer

    def _group(self, spec: DatasourceSpec) -> Consumer:
        """A consumer of the sink's group that never joins it: its metadata (generation
        -1) commits offsets as a group without members, and it reads them back."""
        group = self.settings.group(SINK, spec.name)
        if group not in self._consumers:
            self._consumers[group] = Consumer(
                self._config()
                | {
                    "group.id": group,
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        return self._consumers[group]

    def _spec(self, datasource: str) -> DatasourceSpec:
        spec, rollup = self.registry.owner(datasource)
        if rollup is not None:
            raise StoreError(f"{datasource!r} is a rollup: commits go to its datasource")
        return spec

    def _key_states(self, spec: DatasourceSpec) -> tuple[KeyStates, int]:
        """The spec's key state, read back from its changelog at the first commit, and
        the refined topic's partition count (a key's partition is chosen here, so its
        state and its rows share it, as the relay's do)."""
        if spec.name not in self._states:
            topic = refined_topic(self.settings, spec)
            try:
                meta = self._group(spec).list_topics(topic, timeout=10).topics.get(topic)
            except KafkaException as exc:
                raise _translate(exc, f"describing {topic}") from exc
            if meta is None or meta.error is not None:
                raise BrokerError(f"topic {topic} does not exist (run: tally topics create)")
            count = len(meta.partitions)
            states = KeyStates(spec)
            if spec.rollups:
                restore(states, self._config(), state_topic(self.settings, spec), range(count))
            self._states[spec.name] = states, count
        return self._states[spec.name]

    # --- writes --------------------------------------------------------------------------

    def commit(
        self,
        datasource: str,
        rows: pa.Table | Sequence[Mapping[str, Any]],
        offsets: Mapping[TP, OffsetRange] | None = None,
        *,
        now: datetime | None = None,
        dead_letters: Sequence[DeadLetterRecord] = (),
    ) -> CommitResult:
        spec = self._spec(datasource)
        table = rows if isinstance(rows, pa.Table) else rows_to_table(list(rows), row_schema(spec))
        encoder = self._encoders.setdefault(spec.name, RowEncoder(spec))
        keys, values = encoder.encode(table)
        states, count = self._key_states(spec)
        parts = [zlib.crc32(k) % count for k in keys]
        plan = states.plan(table, parts) if spec.rollups else None
        topic = refined_topic(self.settings, spec)
        letters_topic = self.settings.topic(spec.dead_letter_topic)
        prod = self._producer_for_commit()
        try:
            prod.begin_transaction()
            for key, value, part in zip(keys, values, parts, strict=True):
                _produce(prod, topic, key, value, None, part)
            for letter in dead_letters:
                _produce(prod, letters_topic, letter.key, letter.value, headers(letter))
            if plan is not None:
                for rollup in spec.rollups:
                    if (deltas := plan.deltas.get(rollup.name)) is not None:
                        target = rollup_topic(self.settings, spec, rollup)
                        for delta in encode_deltas(spec, rollup, deltas):
                            _produce(prod, target, None, delta, None)
                changelog = state_topic(self.settings, spec)
                for part, entity, state in plan.states:
                    _produce(prod, changelog, entity.encode(), encode_state(state), None, part)
            if offsets:
                tps = [
                    TopicPartition(t, p, r.end, metadata=logmark.encode(r.log))
                    for (t, p), r in offsets.items()
                ]
                meta = self._group(spec).consumer_group_metadata()
                prod.send_offsets_to_transaction(tps, meta, self._timeout_s)
            prod.commit_transaction(self._timeout_s)
        except KafkaException as exc:
            self._abort()
            raise _translate(exc, f"committing to {topic}") from exc
        if plan is not None:
            states.apply(plan)  # committed with the changelog
        return CommitResult(
            datasource=spec.name,
            rows_in=table.num_rows,
            rows_written=len(values),
            stale_rows=0,  # merge on read: Druid keeps every version, reads pick the latest
            tombstones=0,
            segments=0,  # Druid's task decides its segments
            rollup_rows=0 if plan is None else sum(t.num_rows for t in plan.deltas.values()),
            late_rows=0,
            partitions=(),
        )

    def _abort(self) -> None:
        """A failed transaction's producer is dropped: the next commit makes a new one
        (its id is new, so nothing waits for the old transaction but its timeout)."""
        old, self._producer = self._producer, None
        if old is not None:
            with contextlib.suppress(KafkaException):
                old.abort_transaction(5)

    def stored_offsets(self, datasource: str) -> dict[TP, int]:
        return {tp: pos.offset for tp, pos in self.stored_positions(datasource).items()}

    def stored_positions(self, datasource: str) -> dict[TP, StoredPosition]:
        """The sink group's committed offsets on the source topic (read stable), with
        the log each is of (``storage.logmark``)."""
        spec = self._spec(datasource)
        consumer = self._group(spec)
        source = self.settings.topic(spec.datasource.topic)
        try:
            meta = consumer.list_topics(source, timeout=10).topics.get(source)
            if meta is None or meta.error is not None:
                return {}
            wanted = [TopicPartition(source, p) for p in sorted(meta.partitions)]
            got = consumer.committed(wanted, timeout=self._timeout_s * 3)
        except KafkaException as exc:
            raise _translate(exc, f"reading the committed offsets of {source}") from exc
        out = {(tp.topic, tp.partition): logmark.decode(tp.offset, tp.metadata) for tp in got}
        return {tp: pos for tp, pos in out.items() if pos is not None}

    def reset_positions(self, datasource: str, positions: Mapping[TP, StoredPosition]) -> None:
        """Committed for the sink's group, as a group without members: Kafka refuses
        it while an ingester is a member (the reset is for stopped ingesters)."""
        spec = self._spec(datasource)
        offsets = [
            TopicPartition(t, p, pos.offset, metadata=logmark.encode(pos.log, pos.reset))
            for (t, p), pos in positions.items()
        ]
        try:
            self._group(spec).commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise _translate(exc, f"resetting the offsets of {spec.name}") from exc

    # --- what the watcher and operators use ------------------------------------------

    def pending_batches(self, datasource: str) -> list[dict[TP, OffsetRange]]:
        return []  # a commit is one transaction: never left half-done

    @property
    def compactor(self) -> DruidCompactor:
        """The watcher's (made on first use: it needs the broker's, the overlord's and
        the coordinator's URLs, which a relay does not)."""
        if self._compactor is None:
            self._compactor = DruidCompactor(self.settings, self.registry)
        return self._compactor

    @property
    def outbox(self) -> _TopicOutbox:
        return self._outbox

    def datasource_names(self, datasource: str | None = None) -> list[str]:
        """Datasources and their rollups (each a Druid datasource)."""
        specs = [self._spec(datasource)] if datasource is not None else list(self.registry)
        return [n for spec in specs for n in (spec.name, *(r.name for r in spec.rollups))]

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]:
        """Per Druid time chunk (UTC, ``storage.druid.compactor``) of the datasource and
        its rollups, from ``sys.segments``."""
        return self.compactor.partition_stats(datasource)

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]:
        return self.compactor.live_segments(datasource)

    def partition_range(self, datasource: str, partition: str) -> tuple[datetime, datetime]:
        """A partition here is a Druid time chunk: its UTC bounds."""
        return self.compactor.target(datasource).chunk(partition)

    def rebuild_rollups(
        self, datasource: str, partition: str | None = None, rollup_name: str | None = None
    ) -> list[RebuildReport]:
        """Each rollup (or ``rollup_name``) corrected to Druid's merged base within the
        base partition (None: everywhere), by corrective deltas
        (``storage.druid.repair``); returns once Druid has summed them."""
        spec = self._spec(datasource)
        rollups = [spec.rollup(rollup_name)] if rollup_name is not None else list(spec.rollups)
        return [rebuild_rollup(self, spec, r, partition) for r in rollups]

    def produce_deltas(self, spec: DatasourceSpec, rollup: Rollup, deltas: Sequence[bytes]) -> None:
        """Deltas onto the rollup's topic in one transaction (corrective ones)."""
        prod = self._producer_for_commit()
        topic = rollup_topic(self.settings, spec, rollup)
        try:
            prod.begin_transaction()
            for delta in deltas:
                _produce(prod, topic, None, delta, None)
            prod.commit_transaction(self._timeout_s)
        except KafkaException as exc:
            self._abort()
            raise _translate(exc, f"producing corrective deltas to {topic}") from exc

    def kafka_config(self) -> dict[str, Any]:
        return self._config()

    def repair(
        self,
        datasource: str,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        remove_keys: Sequence[str] = (),
        *,
        expect: Mapping[str, tuple[int, str] | None] | None = None,
        partitions: Sequence[str] = (),
    ) -> RepairResult:
        """Keys Druid holds older than ``rows`` (or not at all) get them, committed as
        the relay commits (rows, deltas, key states); keys it holds at that version or
        newer, and ``remove_keys``, come back ``unrepairable`` (a reindex of their
        chunks; ``capabilities.repair`` is false). The relay must be stopped."""
        spec = self._spec(datasource)
        table = rows if isinstance(rows, pa.Table) else rows_to_table(list(rows), row_schema(spec))
        return repair_rows(self, spec, table, remove_keys)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()


def _produce(
    prod: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    hdrs: list[tuple[str, str | bytes | None]] | None,
    partition: int | None = None,
) -> None:
    extra: dict[str, Any] = {} if partition is None else {"partition": partition}
    while True:
        try:
            prod.produce(topic, value=value, key=key, headers=hdrs, **extra)
            return
        except BufferError:  # the local queue is full: let deliveries drain
            prod.poll(0.05)


def _translate(exc: KafkaException, what: str) -> BrokerUnavailable | BrokerError:
    err = exc.args[0] if exc.args else None
    text = err.str() if isinstance(err, KafkaError) else str(exc)
    if isinstance(err, KafkaError) and (err.retriable() or err.code() == KafkaError._TRANSPORT):
        return BrokerUnavailable(f"{what}: {text}")
    return BrokerError(f"{what}: {text}")

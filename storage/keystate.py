"""Per-key state for rollups fed with retraction deltas, on engines that cannot
update a row by key (Druid): what each key contributed last, so a new version can
retract it.

The relay keeps, for every key of the source partitions it owns, the latest
(version, event_id) it accepted and that version's ``spec.rollup_state_columns``.
A batch is planned against it (``plan``): rows older than or equal to the state are
stale and change no rollup; every accepted row adds its contribution (+1) and
retracts its predecessor's (−1), summed per (bucket, dimensions) by
``storage.deltas.signed_deltas``. Druid then sums the deltas (longSum), so each
rollup equals the aggregate of the latest state per key (ADR 0006).

Where the state lives: in memory, per source partition, and in a compacted Kafka
changelog topic (``storage.refined.state_topic``, one partition per source
partition, keyed by the datasource key), written in the same Kafka transaction as
the deltas, the refined rows and the consumer offsets. A plan is applied to memory
only once its transaction committed (``apply``); when partitions are assigned (a
start, a rebalance, a re-seek after a fence) their state is read back from the
changelog to its end, read_committed — exactly the state at the committed offsets,
since both were committed together. It moves with its partitions because it is
partitioned as they are.

Memory: one dict entry per key holding a tuple (version, event_id, time in epoch
microseconds, dimensions, summed columns); ``bench/druid.py`` measures the bytes per
key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from storage.deltas import latest_in_batch, signed_deltas, signed_states
from tally.errors import BrokerUnavailable
from tally.specs import DatasourceSpec

State = tuple[Any, ...]  # (version, event_id, *spec.rollup_state_columns)
PART = "_partition"


@dataclass
class DeltaPlan:
    """What one batch changes: rollup deltas and the states to remember once its
    transaction has committed."""

    deltas: dict[str, pa.Table] = field(default_factory=dict)  # rollup name → rows
    states: list[tuple[int, str, State]] = field(default_factory=list)  # (partition, key, new)
    stale: int = 0


class KeyStates:
    """The latest accepted state of every key, per source partition."""

    def __init__(self, spec: DatasourceSpec) -> None:
        self.spec = spec
        self.columns = spec.rollup_state_columns
        # Dimension values repeat across keys (a few merchants, methods, statuses):
        # one string object each, not one per key.
        self._shared: dict[str, str] = {}
        self._strings = {i for i, c in enumerate(self.columns) if spec.columns[c].type == "string"}
        self.partitions: dict[int, dict[str, State]] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.partitions.values())

    # --- planning ------------------------------------------------------------------

    def plan(self, table: pa.Table, partitions: Sequence[int]) -> DeltaPlan:
        """The deltas of ``table`` (decoded rows; ``partitions[i]`` is row i's source
        partition) against the state: pure, the state is not changed."""
        ds = self.spec.datasource
        out = DeltaPlan()
        if not table.num_rows:
            return out
        table = latest_in_batch(self.spec, table.append_column(PART, pa.array(partitions)))
        keys = table.column(ds.key).to_pylist()
        versions = table.column(ds.version).to_pylist()
        event_ids = table.column(ds.event_id).to_pylist()
        parts = table.column(PART).to_pylist()
        olds = [self.partitions.get(p, {}).get(k) for p, k in zip(parts, keys, strict=True)]
        accept = [
            old is None or (v, e) > (old[0], old[1])
            for old, v, e in zip(olds, versions, event_ids, strict=True)
        ]
        out.stale = len(partitions) - sum(accept)
        if not any(accept):
            return out
        table = table.filter(pa.array(accept))
        added = table.select(list(self.columns))
        retracted = [old[2:] for old in compress(olds, accept) if old is not None]
        signed = signed_states(self.spec, added, retracted)
        for rollup in self.spec.rollups:
            deltas = signed_deltas(self.spec, rollup, signed)
            if deltas.num_rows:
                out.deltas[rollup.name] = deltas
        values = [
            _micros(added.column(c))
            if c == ds.time
            else self._share(_plain(added.column(c)))
            if i in self._strings
            else _plain(added.column(c))
            for i, c in enumerate(self.columns)
        ]
        accepted = zip(
            compress(parts, accept),
            compress(keys, accept),
            compress(versions, accept),
            compress(event_ids, accept),
            zip(*values, strict=True),
            strict=True,
        )
        out.states = [(p, k, (v, e, *state)) for p, k, v, e, state in accepted]
        return out

    def apply(self, plan: DeltaPlan) -> None:
        """Remember a plan's states: its transaction committed."""
        for part, key, state in plan.states:
            self.partitions.setdefault(part, {})[key] = state

    # --- ownership -----------------------------------------------------------------

    def drop(self, partitions: Iterable[int]) -> None:
        for part in partitions:
            self.partitions.pop(part, None)

    def load(self, part: int, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace partition ``part``'s state with changelog ``entries`` (key, value),
        later entries winning, as compaction would keep them."""
        states: dict[str, State] = {}
        shared = self._shared.setdefault
        strings = {i + 2 for i in self._strings}  # after version and event_id
        for key, value in entries:
            state = orjson.loads(value)
            for i in strings:
                if state[i] is not None:
                    state[i] = shared(state[i], state[i])
            states[key.decode()] = tuple(state)
        self.partitions[part] = states

    def _share(self, values: list[Any]) -> list[Any]:
        shared = self._shared.setdefault
        return [v if v is None else shared(v, v) for v in values]


def encode_state(state: State) -> bytes:
    return orjson.dumps(state)


def restore(
    states: KeyStates,
    config: Mapping[str, Any],
    topic: str,
    partitions: Sequence[int],
    timeout_s: float = 60.0,
) -> None:
    """Read ``partitions`` of the changelog ``topic`` from their beginning to their
    end (read_committed, end-of-partition from a fetch, as ``ingest.kafka.unread``:
    the dev broker misreports end offsets, yet a transaction still open at that end
    is waited out: ``_settled``) into ``states``."""
    if not partitions:
        return
    consumer = Consumer(
        dict(config)
        | {
            "group.id": f"{topic}.restore",  # never joined, nothing committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
        }
    )
    # The log's end as a read_uncommitted client sees it: a read_committed one is told
    # the last stable offset, which is where it stopped.
    ends = Consumer(
        dict(config) | {"group.id": f"{topic}.restore", "isolation.level": "read_uncommitted"}
    )
    entries: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in partitions}
    pending = set(partitions)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"restoring key state from {topic}: partitions {sorted(pending)} silent"
                )
            for m in consumer.consume(10_000, 0.2):
                err, part = m.error(), m.partition()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and _settled(ends, m):
                        pending.discard(part)
                    continue
                key, value = m.key(), m.value()
                if part in entries and key is not None and value is not None:
                    entries[part].append((key, value))
                    deadline = time.monotonic() + timeout_s
    except KafkaException as exc:
        raise BrokerUnavailable(f"restoring key state from {topic}: {exc}") from exc
    finally:
        consumer.close()
        ends.close()
    for part, got in entries.items():
        states.load(part, got)


def _settled(ends: Consumer, eof: Any) -> bool:
    """Whether an end-of-partition is the log's end. A read_committed consumer hits
    it at the last stable offset: a transaction still open there (a killed relay's,
    or one whose commit markers reach this partition after the consumer offsets')
    would be cut off, and its committed states lost, so wait until it is settled:
    the end is the high watermark."""
    _low, high = ends.get_watermark_offsets(
        TopicPartition(eof.topic(), eof.partition()), timeout=5, cached=False
    )
    return high is None or (eof.offset() or 0) >= high


def _plain(column: pa.ChunkedArray) -> list[Any]:
    values: list[Any] = column.to_pylist()
    return values


def _micros(column: pa.ChunkedArray) -> list[int]:
    values: list[int] = pc.cast(column.cast(pa.timestamp("us", tz="UTC")), pa.int64()).to_pylist()
    return values

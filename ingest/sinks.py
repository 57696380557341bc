"""The sinks a consumer loop feeds: OLAP (exactly-once by catalog offsets) and search
(idempotent upserts, Kafka offsets committed after the index); on engines that ingest
from Kafka themselves the OLAP sink is the relay of ``ingest.relay`` instead."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Protocol

import pyarrow as pa
from confluent_kafka import Consumer

from ingest.deadletter import Publisher, record
from ingest.decode import Decoded, Decoder
from ingest.kafka import committed_positions, read_ranges
from search import Doc, SearchIndex
from storage import OffsetRange, OlapStore, StoredPosition
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tally.timeutil import utc_datetimes

log = logging.getLogger(__name__)
TP = tuple[str, int]


class Sink(Protocol):
    name: str
    uses_kafka_offsets: bool  # resume from Kafka's committed offsets (else the sink's own)
    # The sink moves the group's offsets itself, atomically with its output (the relay:
    # in its Kafka transaction); the runner must then never commit them too.
    commits_offsets_itself: bool
    linger_s: float  # how long a micro-batch may wait to fill

    def bind(self, consumer: Consumer) -> None:
        """Called once, before subscribing, with the runner's consumer."""
        ...

    def start_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """Take over newly assigned partitions: where to resume each, and the log that
        position is of (None: nothing stored, start at the beginning)."""
        ...

    def resume_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """Where each partition would resume, owned or not, with no side effect (the
        idle probe asks for every partition of the topic)."""
        ...

    def released(self, partitions: list[TP]) -> None: ...

    def write(self, decoded: Decoded, ranges: Mapping[TP, OffsetRange]) -> tuple[int, int]:
        """Make the batch durable; return (rows written, stale rows)."""
        ...

    def after_write(self) -> int:
        """Follow-up that may fail without undoing the write (publishing dead letters);
        returns how many dead letters it published."""
        ...

    def newest_committed(self) -> datetime | None: ...

    def close(self) -> None: ...


class OlapSink:
    name = "olap"
    commits_offsets_itself = False

    def __init__(self, settings: Settings, spec: DatasourceSpec, store: OlapStore) -> None:
        self.linger_s = settings.ingest.batch_max_wait_s
        self.settings = settings
        self.spec = spec
        self.store = store
        # An engine that commits offsets with the rows resumes from them (Kafka's are
        # advisory); any other resumes from Kafka's, committed after the write.
        self.uses_kafka_offsets = not store.capabilities.transactional_offsets
        self.publisher = Publisher(settings, spec, store.outbox)
        self._owned: set[TP] = set()  # whose dead letters this sink publishes
        self._newest: datetime | None = None
        self._consumer: Consumer | None = None

    def bind(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def start_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        self._owned.update(partitions)
        self.publisher.taken_over()
        if self.store.capabilities.resumable_commits:
            self._finish_pending(partitions)
        return self.resume_positions(partitions)

    def _finish_pending(self, partitions: list[TP]) -> None:
        """A batch whose loads were interrupted (a crash between them) is committed
        again with exactly its ranges, read back from the topic, before these
        partitions take new batches: the store's labels refuse what it had loaded
        and load the rest. Whole batches: one touching a partition another member
        owns is finished here too, which the labels make harmless if both do."""
        mine = set(partitions)
        for ranges in self.store.pending_batches(self.spec.name):
            if not mine & set(ranges):
                continue
            log.warning(
                "%s: finishing a batch interrupted mid-load (%s)",
                self.spec.name,
                ", ".join(f"{t}[{p}] {r.start}..{r.end}" for (t, p), r in sorted(ranges.items())),
            )
            messages = read_ranges(
                self.settings, {tp: (r.start, r.end) for tp, r in ranges.items()}
            )
            decoded = Decoder(self.spec).decode(messages)
            self.write(decoded, ranges)

    def resume_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """The catalog's positions: nothing stored there means the store holds nothing
        of the partition, whatever the group committed (a new data directory beside
        an old group starts at the beginning)."""
        if self.uses_kafka_offsets:
            assert self._consumer is not None, "bind() first"
            return committed_positions(self._consumer, partitions)
        stored = self.store.stored_positions(self.spec.name)
        return {tp: stored.get(tp) for tp in partitions}

    def released(self, partitions: list[TP]) -> None:
        self._owned.difference_update(partitions)

    def write(self, decoded: Decoded, ranges: Mapping[TP, OffsetRange]) -> tuple[int, int]:
        letters = [record(r, self.spec.name, self.name) for r in decoded.rejected]
        result = self.store.commit(self.spec.name, decoded.table, ranges, dead_letters=letters)
        newest = _newest(decoded.table, self.spec.datasource.time)
        if newest is not None and (self._newest is None or newest > self._newest):
            self._newest = newest
        return result.rows_written, result.stale_rows

    def after_write(self) -> int:
        return self.publisher.publish(self._owned)

    def newest_committed(self) -> datetime | None:
        return self._newest

    def close(self) -> None:
        self.store.close()


class SearchSink:
    name = "search"
    uses_kafka_offsets = True
    commits_offsets_itself = False

    def __init__(self, spec: DatasourceSpec, index: SearchIndex, linger_s: float) -> None:
        self.spec = spec
        self.index = index
        self.linger_s = linger_s
        self._newest: datetime | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="search-commit")
        self._consumer: Consumer | None = None

    def bind(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def start_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        return self.resume_positions(partitions)

    def resume_positions(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        """The group's committed offsets (the index's upserts are idempotent: a
        replay after a lost commit rewrites the same documents)."""
        assert self._consumer is not None, "bind() first"
        return committed_positions(self._consumer, partitions)

    def released(self, partitions: list[TP]) -> None:
        for _topic, partition in partitions:
            self.index.release(partition)

    def write(self, decoded: Decoded, ranges: Mapping[TP, OffsetRange]) -> tuple[int, int]:
        ds = self.spec.datasource
        table = decoded.table
        if not table.num_rows:
            return 0, 0
        cols = {
            name: table.column(name).to_pylist()
            for name in {ds.key, ds.tenant, ds.version, ds.event_id, *ds.searchable}
        }
        cols[ds.time] = utc_datetimes(table.column(ds.time))
        # An index sharded by source partition (tantivy) takes each partition's docs
        # apart; a cluster places documents itself, so the batch is one bulk write and
        # one refresh instead of one per partition.
        by_partition = self.index.capabilities.shards_by_source_partition
        shard_of = _shard_column(decoded) if by_partition else [0] * table.num_rows
        per_shard: dict[int, list[Doc]] = {}
        for i in range(table.num_rows):
            doc = Doc(
                key=cols[ds.key][i],
                tenant=cols[ds.tenant][i],
                time=cols[ds.time][i],
                version=cols[ds.version][i],
                event_id=cols[ds.event_id][i],
                text={f: cols[f][i] for f in ds.searchable},
            )
            per_shard.setdefault(shard_of[i], []).append(doc)
        written = stale = 0
        newest_of: dict[int, datetime] = {}
        for shard, docs in per_shard.items():
            result = self.index.upsert(shard, docs)
            newest_of[shard] = max(d.time for d in docs)
            written += result.written
            stale += result.stale
        # Shard commits are independent and mostly wait on the engine and the disk
        # (tantivy releases the GIL), so they run side by side.
        list(self._pool.map(lambda item: self.index.commit(*item), newest_of.items()))
        newest = max(newest_of.values())
        if self._newest is None or newest > self._newest:
            self._newest = newest
        return written, stale

    def after_write(self) -> int:
        return 0

    def newest_committed(self) -> datetime | None:
        return self._newest

    def close(self) -> None:
        self._pool.shutdown()
        self.index.close()


def _newest(table: pa.Table, column: str) -> datetime | None:
    if not table.num_rows:
        return None
    import pyarrow.compute as pc

    value = pc.max(table.column(column)).as_py()
    return value.astimezone(UTC) if isinstance(value, datetime) else None


def _shard_column(decoded: Decoded) -> list[int]:
    """Source Kafka partition of each decoded row (rows keep message order)."""
    return decoded.partitions

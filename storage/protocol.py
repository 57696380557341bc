"""The contract every OLAP backend implements (embedded, StarRocks, Druid)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from tally.settings import Settings
    from tally.specs import SpecRegistry


@dataclass(frozen=True)
class Capabilities:
    """What an engine does natively; callers branch on these, never on engine names."""

    name: str
    sql_dialect: str  # sqlglot dialect the backend renders query trees in
    # Consumer offsets commit in the same transaction as the rows they cover, so the
    # OLAP sink resumes from ``stored_offsets`` (else from Kafka's committed offsets).
    transactional_offsets: bool
    # Tally decides when a partition is compacted (the watcher runs ``store.compactor``);
    # without it the engine compacts by itself and the watcher has nothing to do.
    manual_compaction: bool
    packs: bool = False  # ``compactor.pack``: cold partitions share one file
    # A compaction is a task the engine runs (``compactor.compact`` waits for it): the
    # watcher keeps up to ``compaction.max_in_flight`` going and polls meanwhile.
    compacts_in_engine: bool = False
    # ``compactor.compact`` can merge some of a partition's segments (a size tier);
    # without it a compaction rewrites the partition's every sealed segment.
    partial_compaction: bool = True
    resident_rollups: bool = False  # rollup state is served from memory (``rollup_state``)
    # The engine ingests the base datasource itself, from a Kafka topic of decoded rows
    # (its own exactly-once consumer, e.g. Druid's supervisor): the OLAP sink is then a
    # relay to that topic (``ingest.relay``), and ``commit`` is not how rows arrive.
    ingests_from_kafka: bool = False
    # Rollup datasources are stored (and so readable by name): the router may answer
    # from them and /v1/sql may name them. Without it aggregates read the base.
    rollup_datasources: bool = True
    # SQL naming a datasource reads its merged rows (the embedded engine's views);
    # without it the name holds every stored version and readers use ``relation``.
    merged_views: bool = True
    # SQL may join datasources (payments ⋈ settlements): the engine plans a join of
    # two merged relations. Without it /v1/sql refuses a JOIN with its reason.
    sql_joins: bool = True
    # A commit is visible to the next read. Without it the engine ingests what a commit
    # wrote asynchronously (Druid's supervisor reads it from Kafka): a reader shows it
    # once the engine caught up, and callers poll (``ingest_figures``) instead.
    visible_on_commit: bool = True
    # A commit's dead letters wait in ``store.outbox`` until published. Without it the
    # commit produces them to the dead-letter topic in its own transaction, and
    # ``outbox.pending`` is always empty.
    dead_letter_outbox: bool = True
    # A commit is a sequence of labelled, idempotent loads (StarRocks): one that was
    # interrupted is recorded (``store.pending_batches``) and must be committed again
    # with exactly its ranges before those partitions take new batches; the OLAP sink
    # re-reads those offsets from the topic when it takes the partitions over.
    resumable_commits: bool = False
    # ``store.repair`` can overwrite a stored key whatever its version (``tally verify
    # --repair``); without it the engine's stored rows cannot be rewritten by key.
    repair: bool = True
    # Tally keeps the segment files and checks them (digests, sizes): a damaged one is
    # found, isolated and rebuilt from the log. False where the engine keeps its own
    # (Druid reloads segments from deep storage; StarRocks replicates tablets).
    checks_files: bool = False


@dataclass(frozen=True)
class OffsetRange:
    """Consumer positions a batch covers: ``start`` = position before, ``end`` = after.

    Both follow Kafka's convention of "next offset to read", so the ``end`` of one
    batch is the ``start`` of the next.
    """

    start: int
    end: int
    # The log the offsets are of (Kafka's topic id, KIP-516), stored with the end so a
    # later owner can tell the position belongs to the topic it now reads; None: the
    # broker gives none (the position is then checked against the log's range only).
    log: str | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid offset range {self.start}..{self.end}")


TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class StoredPosition:
    """Where a sink resumes one source partition, and what that position is of."""

    offset: int  # next offset to read
    log: str | None = None  # the topic id it was stored from (None: not recorded)
    reset: str | None = None  # the operator's last reset of it: what, who, when


@dataclass(frozen=True)
class CommitResult:
    datasource: str
    rows_in: int
    rows_written: int
    stale_rows: int
    tombstones: int
    segments: int
    rollup_rows: int
    late_rows: int
    partitions: tuple[str, ...]


@dataclass(frozen=True)
class CompactionResult:
    datasource: str
    partition: str
    replaced_segments: int
    rows_in: int
    rows_out: int
    bytes_in: int
    bytes_out: int
    segment_id: int | None


@dataclass(frozen=True)
class RepairResult:
    """What :meth:`OlapStore.repair` changed."""

    datasource: str
    rows_written: int  # keys now holding the row they were given
    keys_removed: int  # keys removed that had a live row
    partitions: tuple[str, ...]  # base partitions rewritten (rebuild their rollups next)
    skipped: tuple[str, ...] = ()  # keys whose stored state changed since the caller looked
    unrepairable: tuple[str, ...] = ()  # keys the engine could not rewrite (its docs say why)


@dataclass
class RebuildReport:
    """What :meth:`OlapStore.rebuild_rollups` found different and repaired."""

    rollup: str
    partition: str | None
    groups_repaired: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)  # first few, for humans

    def as_dict(self) -> dict[str, Any]:
        return {
            "rollup": self.rollup,
            "partition": self.partition,
            "groups_repaired": self.groups_repaired,
            "differences": self.differences,
        }


@dataclass(frozen=True)
class DeadLetterRecord:
    """A message a sink could not use, recorded with the batch that skipped it."""

    id: str  # "<datasource>:<topic>:<partition>:<offset>", unique per source message
    datasource: str
    sink: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    failed_at: float


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SegmentInfo:
    id: int
    datasource: str
    partition: str
    path: str
    rows: int
    bytes: int
    seq: int
    created_at: float
    packed: bool = False  # one of several partitions in one file (a pack)
    sealed: bool = True  # immutable; false while an engine's streaming task still holds it


@dataclass(frozen=True)
class Damage:
    """A live segment whose file was found missing, truncated, altered or unreadable
    (``reason`` never names the path: it may reach a client)."""

    datasource: str
    partition: str
    path: str
    reason: str
    found_at: float
    found_by: str  # "open", "watcher", "verify", …


@dataclass(frozen=True)
class IngestFigures:
    """What ingestion has stored, per the catalog (for dashboards and alerts)."""

    offsets: Mapping[tuple[str, int], int]  # (topic, partition) → next offset committed
    datasets: Mapping[str, tuple[int, int, int, int]]  # datasource → segments, rows, bytes, late
    dead_letters: Mapping[str, tuple[int, int]]  # sink → (recorded, still unpublished)
    newest_event_at: datetime | None


@dataclass(frozen=True)
class PartitionStats:
    datasource: str
    partition: str
    segments: int
    rows: int
    bytes: int
    late_rows: int
    last_write_at: datetime | None
    last_compacted_at: datetime | None


class Compactor(Protocol):
    """Rewrites stored segments: what the compaction watcher and operators drive.

    Present on every store; where ``capabilities.manual_compaction`` is false the
    engine compacts by itself and nothing calls it.
    """

    def compact(
        self, datasource: str, partition: str, segment_ids: Sequence[int] | None = None
    ) -> CompactionResult | None:
        """Replace segments of one partition (all live ones by default) with one
        deduplicated segment, atomically; segments committed meanwhile stay live."""
        ...

    def pack(self, datasource: str, segment_ids: Sequence[int]) -> CompactionResult | None:
        """Put partitions held in one segment each into one file (``capabilities.packs``)."""
        ...

    def collect_garbage(self, *, orphan_grace_s: float | None = None) -> int:
        """Remove what no live segment needs any more; returns how many files went."""
        ...


class DeadLetterOutbox(Protocol):
    """Dead letters committed with their batch (``OlapStore.commit(dead_letters=)``),
    waiting to be published to the dead-letter topic."""

    def pending(self, datasource: str) -> list[DeadLetterRecord]: ...

    def mark_published(self, published: Sequence[tuple[str, int, int]]) -> None:
        """(id, dead-letter topic partition, offset) of letters the broker acknowledged."""
        ...


class OlapStore(Protocol):
    """Writer side. Safe to use from several processes at once."""

    capabilities: Capabilities

    @property
    def compactor(self) -> Compactor: ...

    @property
    def outbox(self) -> DeadLetterOutbox: ...

    def commit(
        self,
        datasource: str,
        rows: pa.Table | Sequence[Mapping[str, Any]],
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        *,
        now: datetime | None = None,
        dead_letters: Sequence[DeadLetterRecord] = (),
    ) -> CommitResult:
        """Commit a batch exactly once: rows, rollup deltas, ``offsets`` (fenced: their
        starts must equal the stored ones) and the batch's ``dead_letters`` together."""
        ...

    def stored_offsets(self, datasource: str) -> dict[TopicPartition, int]: ...

    def stored_positions(self, datasource: str) -> dict[TopicPartition, StoredPosition]:
        """``stored_offsets`` with the log each was stored from and its last reset."""
        ...

    def reset_positions(
        self, datasource: str, positions: Mapping[TopicPartition, StoredPosition]
    ) -> None:
        """Set these positions whatever is stored (``tally ingest reset``: an operator's
        decision after a position check stopped the partitions), with their reset note.
        Only while no ingester of the datasource runs: a running one would be fenced."""
        ...

    def pending_batches(self, datasource: str) -> list[dict[TopicPartition, OffsetRange]]:
        """Batches a crash interrupted mid-commit (``capabilities.resumable_commits``;
        always empty elsewhere): commit each again with exactly these ranges."""
        ...

    def datasource_names(self, datasource: str | None = None) -> list[str]:
        """Stored datasources: ``datasource`` (a base: with its rollups), or all."""
        ...

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]: ...

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]: ...

    def partition_range(self, datasource: str, partition: str) -> tuple[datetime, datetime]:
        """The instants [start, end) a partition key of a base or rollup covers."""
        ...

    def rebuild_rollups(
        self, datasource: str, partition: str | None = None, rollup_name: str | None = None
    ) -> list[RebuildReport]: ...

    def check_files(self, *, full: bool, found_by: str) -> list[Damage]:
        """Examine the stored files (sizes; with ``full``, digests too), record what is
        damaged, return every damaged segment known. Empty without
        ``capabilities.checks_files``."""
        ...

    def restore_partitions(
        self,
        datasource: str,
        tables: Mapping[str, pa.Table],
        read_to: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Replace base partitions whole with ``tables`` (partition → every row it must
        hold, from the log read to ``read_to``), atomically. For damaged partitions
        (``checks_files``); rebuild their rollups next (``rebuild_rollups``)."""
        ...

    def restore_rollup(self, rollup: str, partition: str) -> None:
        """Recompute one rollup partition whole from the merged base and replace it."""
        ...

    def repair(
        self,
        datasource: str,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        remove_keys: Sequence[str] = (),
        *,
        expect: Mapping[str, tuple[int, str] | None] | None = None,
        partitions: Sequence[str] = (),
    ) -> RepairResult:
        """Make the merged view hold exactly ``rows`` for their keys and nothing for
        ``remove_keys``, bypassing the version guard (``tally verify --repair``)."""
        ...

    def close(self) -> None: ...


class OlapReader(Protocol):
    """Query side; never opens the store for writing."""

    capabilities: Capabilities

    def query(
        self, sql: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> QueryResult: ...

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table: ...

    def relation(
        self,
        name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        tenants: Sequence[str] | None = None,
        skip_damaged: bool = False,
    ) -> Any:
        """A relation (sqlglot expression) over only the partitions overlapping the range.

        A damaged partition in the range (``damaged``) raises ``PartitionDamaged``;
        ``skip_damaged`` leaves it out instead (``tally verify`` compares the rest).

        ``tenants``: the caller reads only these tenants' rows (it still filters on them
        itself); an engine that merges on read may restrict to them before merging, so
        the cost follows the merchant, not the whole datasource."""
        ...

    def partition_groups(
        self, name: str, start: datetime | None = None, end: datetime | None = None
    ) -> list[list[str]]:
        """Keys of the partitions overlapping [start, end), ascending, grouped by what
        one read costs: partitions stored together (the embedded engine's packs) form
        one group, so a caller reading newest-first widens its window by groups."""
        ...

    def rollup_state(
        self,
        rollup: str,
        start: datetime | None = None,
        end: datetime | None = None,
        tenants: Sequence[str] | None = None,
    ) -> pa.Table:
        """Summable rollup rows (bucket, tenant, other dimensions, metrics) of the
        partitions overlapping the range, restricted to ``tenants``; only engines with
        ``capabilities.resident_rollups`` implement it."""
        ...

    def lookup(
        self,
        datasource: str,
        keys: Sequence[str],
        *,
        tenant: str | None = None,
        partitions: Sequence[str] | None = None,
    ) -> pa.Table: ...

    def freshness(self, datasource: str) -> datetime | None: ...

    def damaged(self) -> dict[str, dict[str, str]]:
        """Datasource or rollup → partition → why its stored files cannot be read, as
        far as this reader knows (the catalog's records and its own failed reads).
        Empty where the engine keeps its own files (``capabilities.checks_files``)."""
        ...

    def ingest_figures(self, datasource: str) -> IngestFigures:
        """Committed offsets, stored sizes (the datasource and its rollups) and dead
        letters of ``datasource``, as the store's catalog has them."""
        ...

    def refresh(self) -> object:
        """Bind to the store's newest committed state (queries also do this)."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """An OLAP backend package (``storage/<name>/__init__.py``), as the factory sees it."""

    capabilities: Capabilities

    def open_store(self, settings: Settings, registry: SpecRegistry) -> OlapStore: ...

    def open_reader(self, settings: Settings, registry: SpecRegistry) -> OlapReader: ...

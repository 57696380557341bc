"""The StarRocks writer: a batch is a fixed sequence of labelled Stream Loads.

StarRocks has no transaction spanning tables, so a commit is five kinds of load, in
this order, each with a **label derived from the batch's offsets** (datasource,
table, topic and partition ranges; ``batch_label``):

1. **intent** → ``tally_offsets``: each partition of the batch records the batch
   (its id and every range) as pending, its committed offset unchanged;
2. **dead letters** → ``tally_dead_letters`` (the outbox);
3. **rollup deltas** → each Aggregate table: −previous +new contribution per key
   whose stored (version, event_id) the batch beats, read from the Primary Key table;
4. **base rows** → the Primary Key table, ``merge_condition`` on the version column;
5. **partition writes** → ``tally_partition_writes``: loads, rows and late rows per
   partition (the compaction watcher's figures);
6. **offsets** → ``tally_offsets``: committed = the batch's ends, pending cleared.

Invariant: every load of a batch is applied at most once (StarRocks refuses a label
it has seen, "Label Already Exists"), and a load's content only matters the first
time its label is used. A crash between any two loads leaves the intent; before any
new batch of those partitions, the batch is committed again with **the same ranges**
(``pending_batches``; the OLAP sink re-reads exactly those offsets from Kafka on
take-over), so the same labels: what was loaded is refused, what was not is loaded.
Deltas are computed from the Primary Key table, which the batch's base load (after
them) has not changed yet whenever a delta label is still unused: a replay never
counts a key's change twice. Cancellations are state changes, never DELETEs
(``merge_condition`` does not guard a delete).

What bounds it: StarRocks keeps a label ``label_keep_max_second`` (3 days by
default; ``starrocks.label_keep_s``). An intent older than that cannot trust labels,
so its batch is resumed without deltas and its rollup partitions are rebuilt from
the base table (``rebuild_rollups``) — exact again, whatever was applied before.

Fencing: a batch's starts must equal the committed offsets and no other batch may
be pending there (``OffsetMismatch``). This is checked, then loaded: unlike the
embedded catalog no transaction makes the two one step, so a frozen zombie that
resumes between its check and its loads is not refused; the Kafka group revokes
its partitions first, and the runner drops what it held (ADR 0009).

A row StarRocks filters (``RowsRejected``: a value too long for its column, say)
fails the base load, which frees its label: those rows become dead letters with the
ErrorURL's reason, their deltas are compensated (labelled too), and the base is
loaded again without them — deterministically, so a replay does the same.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from storage.calendar import partitions_of
from storage.deltas import BUCKET, latest_in_batch, signed_deltas, signed_states
from storage.enginefiles import EngineKeepsFiles
from storage.protocol import (
    CommitResult,
    CompactionResult,
    DeadLetterRecord,
    OffsetRange,
    PartitionStats,
    RebuildReport,
    RepairResult,
    SegmentInfo,
    StoredPosition,
)
from storage.schema import row_schema, rows_to_table
from storage.starrocks import ddl
from storage.starrocks.capabilities import CAPABILITIES
from storage.starrocks.connection import Connection
from storage.starrocks.streamload import RowsRejected, StreamLoader
from tally.errors import OffsetMismatch, StoreError, UnknownDatasource
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry
from tally.timeutil import bucket_range, floor, parse_duration, to_micros

log = logging.getLogger(__name__)
TP = tuple[str, int]
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_IN_CHUNK = 2000


def batch_label(table: str, ranges: Mapping[TP, OffsetRange], rows_digest: str = "") -> str:
    """A batch's id, the stem of every label it loads: readable where it can be, a
    digest of the datasource table, topics and partition ranges (≤ 128 chars)."""
    parts = sorted((t, p, r.start, r.end) for (t, p), r in ranges.items())
    digest = hashlib.sha1(orjson.dumps([table, parts, rows_digest])).hexdigest()[:24]
    head = f"p{parts[0][1]}-{parts[0][2]}" if parts else "direct"
    return _LABEL_SAFE.sub("_", f"tally-{table[:40]}-{head}-{digest}")[:100]


def _slot(*parts: object) -> str:
    return hashlib.sha1(orjson.dumps(list(parts))).hexdigest()


class StarRocksStore(EngineKeepsFiles):
    capabilities = CAPABILITIES

    def __init__(
        self,
        settings: Settings,
        registry: SpecRegistry,
        *,
        loader: StreamLoader | None = None,
        sql: Connection | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.loader = loader or StreamLoader(settings.starrocks)
        self.sql = sql or Connection(settings.starrocks)
        self._compactor = StarRocksCompactor(self)

    # --- protocol properties ----------------------------------------------------------

    @property
    def compactor(self) -> StarRocksCompactor:
        return self._compactor

    @property
    def outbox(self) -> StarRocksStore:
        return self

    def _spec(self, datasource: str) -> DatasourceSpec:
        try:
            return self.registry.get(datasource)
        except KeyError as exc:
            raise UnknownDatasource(f"unknown datasource {datasource!r}") from exc

    def _ref(self, table: str) -> exp.Table:
        return exp.table_(table, db=self.settings.starrocks.database, quoted=True)

    # --- offsets and pending batches --------------------------------------------------

    def _offset_rows(self, datasource: str) -> dict[TP, dict[str, Any]]:
        query = (
            exp.select(
                "topic",
                "partition",
                "committed",
                "pending_batch",
                "pending_ranges",
                "pending_at",
                "log_id",
                "reset_note",
            )
            .from_(self._ref(ddl.OFFSETS))
            .where(exp.column("datasource").eq(exp.Literal.string(datasource)))
        )
        names, rows = self.sql.execute(query.sql("starrocks"))
        return {(r[0], int(r[1])): dict(zip(names, r, strict=True)) for r in rows}

    def stored_offsets(self, datasource: str) -> dict[TP, int]:
        return {tp: int(row["committed"]) for tp, row in self._offset_rows(datasource).items()}

    def stored_positions(self, datasource: str) -> dict[TP, StoredPosition]:
        return {
            tp: StoredPosition(int(row["committed"]), row["log_id"], row["reset_note"])
            for tp, row in self._offset_rows(datasource).items()
        }

    def reset_positions(self, datasource: str, positions: Mapping[TP, StoredPosition]) -> None:
        """One labelled load of the new positions (no batch pending: the reset is
        the operator's, made while no ingester runs)."""
        now = datetime.now(UTC)
        rows = [
            self._offset_row(datasource, tp, pos.offset, now, log=pos.log, note=pos.reset)
            for tp, pos in positions.items()
        ]
        self.loader.load(ddl.OFFSETS, rows, f"tally-reset-{uuid.uuid4().hex}")

    def _offset_row(
        self,
        datasource: str,
        tp: TP,
        committed: int,
        now: datetime,
        *,
        log: str | None,
        note: str | None,
        pending: str | None = None,
        encoded: str | None = None,
    ) -> dict[str, Any]:
        topic, partition = tp
        return {
            "slot": _slot(datasource, topic, partition),
            "datasource": datasource,
            "topic": topic,
            "partition": partition,
            "committed": committed,
            "pending_batch": pending,
            "pending_ranges": encoded,
            "pending_at": ddl.utc_text(now) if pending else None,
            "updated_at": ddl.utc_text(now),
            "log_id": log,
            "reset_note": note,
        }

    def pending_batches(self, datasource: str) -> list[dict[TP, OffsetRange]]:
        """Batches whose loads were interrupted: each must be committed again with
        exactly these ranges before its partitions take new ones."""
        seen: dict[str, dict[TP, OffsetRange]] = {}
        for row in self._offset_rows(datasource).values():
            if row["pending_batch"] and row["pending_batch"] not in seen:
                ranges = orjson.loads(row["pending_ranges"] or "[]")
                seen[row["pending_batch"]] = {
                    (t, int(p)): OffsetRange(int(s), int(e)) for t, p, s, e in ranges
                }
        return list(seen.values())

    def _offsets_load(
        self,
        datasource: str,
        ranges: Mapping[TP, OffsetRange],
        label: str,
        *,
        pending: str | None,
        now: datetime,
        stored: Mapping[TP, dict[str, Any]] | None = None,
    ) -> None:
        encoded = orjson.dumps(sorted((t, p, r.start, r.end) for (t, p), r in ranges.items()))
        kept = stored or {}
        rows = [
            self._offset_row(
                datasource,
                tp,
                r.start if pending else r.end,
                now,
                log=r.log or kept.get(tp, {}).get("log_id"),
                note=kept.get(tp, {}).get("reset_note"),
                pending=pending,
                encoded=encoded.decode() if pending else None,
            )
            for tp, r in ranges.items()
        ]
        self.loader.load(ddl.OFFSETS, rows, label)

    def _fence(
        self,
        datasource: str,
        ranges: Mapping[TP, OffsetRange],
        batch: str,
        stored: Mapping[TP, dict[str, Any]],
    ) -> datetime | None:
        """Refuse a batch that does not continue the committed offsets (``stored``),
        or that cuts across another batch still pending; the pending time of this very
        batch (a replay) if it is one."""
        resumed: datetime | None = None
        for tp, rng in ranges.items():
            row = stored.get(tp)
            if row is None:
                continue
            if row["pending_batch"] == batch:
                resumed = row["pending_at"] or datetime.now(UTC)
                continue
            if row["pending_batch"]:
                raise OffsetMismatch(
                    f"{datasource} {tp[0]}[{tp[1]}]: batch {row['pending_batch']} is still"
                    " being loaded there: it must be committed again first (re-seeking)"
                )
            if int(row["committed"]) != rng.start:
                raise OffsetMismatch(
                    f"{datasource} {tp[0]}[{tp[1]}]: the batch starts at {rng.start} but"
                    f" StarRocks has {row['committed']} committed (another writer; re-seeking)"
                )
        return resumed

    # --- commit -----------------------------------------------------------------------

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
        now = now or datetime.now(UTC)
        table = rows if isinstance(rows, pa.Table) else rows_to_table(list(rows), row_schema(spec))
        ranges = dict(offsets or {})
        base = ddl.base_table(self.settings, spec)
        digest = "" if ranges else _rows_digest(spec, table)
        batch = batch_label(base, ranges, digest)
        stored = self._offset_rows(datasource) if ranges else {}
        resumed = self._fence(datasource, ranges, batch, stored) if ranges else None
        if ranges and resumed is None:
            self._offsets_load(
                datasource, ranges, f"{batch}-i", pending=batch, now=now, stored=stored
            )
        trust_labels = resumed is None or (
            now - resumed < timedelta(seconds=self.settings.starrocks.label_keep_s)
        )

        table, oversized = _split_oversized(spec, table, ranges)
        letters = [*dead_letters, *oversized]
        if letters:
            self._load_letters(letters, f"{batch}-dl")
        latest = latest_in_batch(spec, table)
        accepted, replaced, stale = self._plan(spec, latest)
        rollup_rows = (
            self._load_deltas(spec, accepted, replaced, batch, sign=1) if trust_labels else 0
        )
        rounds = 0
        while True:
            try:
                self.loader.load(
                    base,
                    _json_rows(spec, accepted),
                    f"{batch}-b",
                    merge_condition=spec.datasource.version,
                )
                break
            except RowsRejected as exc:
                rounds += 1
                accepted, replaced = self._reject(
                    spec, accepted, replaced, exc, f"{batch}-x{rounds}", ranges, trust_labels
                )
        late, partitions = self._load_writes(spec, accepted, f"{batch}-w", now)
        if ranges:
            self._offsets_load(
                datasource, ranges, f"{batch}-o", pending=None, now=now, stored=stored
            )
        if not trust_labels:
            log.warning(
                "%s: batch %s was left pending longer than StarRocks keeps labels; its"
                " rollup partitions are rebuilt from the base table",
                datasource,
                batch,
            )
            # Every partition the batch touched, the rows StarRocks filtered included:
            # whatever deltas of theirs an earlier attempt loaded, the rebuild undoes.
            for part in _partitions(spec, latest):
                self.rebuild_rollups(datasource, part)
        return CommitResult(
            datasource=datasource,
            rows_in=table.num_rows,
            rows_written=accepted.num_rows,
            stale_rows=stale + (table.num_rows - latest.num_rows),
            tombstones=0,
            segments=0,
            rollup_rows=rollup_rows,
            late_rows=late,
            partitions=tuple(partitions),
        )

    def _plan(
        self, spec: DatasourceSpec, latest: pa.Table
    ) -> tuple[pa.Table, dict[str, tuple[Any, ...]], int]:
        """The batch's rows that beat what is stored, and by key the stored states
        they replace (``spec.rollup_state_columns``, time in epoch microseconds)."""
        ds = spec.datasource
        if not latest.num_rows:
            return latest, {}, 0
        keys = latest.column(ds.key).to_pylist()
        stored = self._stored_states(spec, keys)
        versions = latest.column(ds.version).to_pylist()
        events = latest.column(ds.event_id).to_pylist()
        keep: list[bool] = []
        replaced: dict[str, tuple[Any, ...]] = {}
        for key, version, event in zip(keys, versions, events, strict=True):
            have = stored.get(key)
            wins = have is None or (version, event) > (have[0], have[1])
            keep.append(wins)
            if wins and have is not None:
                replaced[key] = have[2:]
        accepted = latest.filter(pa.array(keep))
        return accepted, replaced, len(keep) - accepted.num_rows

    def _stored_states(
        self, spec: DatasourceSpec, keys: Sequence[str]
    ) -> dict[str, tuple[Any, ...]]:
        ds = spec.datasource
        cols = [ds.key, ds.version, ds.event_id, *spec.rollup_state_columns]
        table = self._ref(ddl.base_table(self.settings, spec))
        out: dict[str, tuple[Any, ...]] = {}
        t = 2 + spec.rollup_state_columns.index(ds.time)  # in (version, event_id, *state)
        for i in range(0, len(keys), _IN_CHUNK):
            chunk = keys[i : i + _IN_CHUNK]
            query = (
                exp.select(*(exp.column(c, quoted=True) for c in cols))
                .from_(table)
                .where(
                    exp.column(ds.key, quoted=True).isin(*(exp.Literal.string(k) for k in chunk))
                )
            )
            _names, rows = self.sql.execute(query.sql("starrocks"))
            for row in rows:
                state = list(row[1:])
                state[t] = to_micros(state[t])
                out[row[0]] = tuple(state)
        return out

    def _load_deltas(
        self,
        spec: DatasourceSpec,
        accepted: pa.Table,
        replaced: Mapping[str, tuple[Any, ...]],
        label: str,
        *,
        sign: int,
    ) -> int:
        """Each rollup's deltas of ``accepted`` over the states they ``replaced``,
        times ``sign`` (−1 takes them back), one labelled load per rollup."""
        if not spec.rollups or (not accepted.num_rows and not replaced):
            return 0
        columns = list(spec.rollup_state_columns)
        signed = signed_states(spec, accepted.select(columns), list(replaced.values()))
        total = 0
        for i, rollup in enumerate(spec.rollups):
            deltas = signed_deltas(spec, rollup, signed)
            if not deltas.num_rows:
                continue
            rows = [
                _rollup_row(
                    spec,
                    rollup,
                    r[BUCKET],
                    [r[d] for d in rollup.dimensions],
                    [sign * r[m.name] for m in spec.parsed_metrics],
                )
                for r in deltas.to_pylist()
            ]
            self.loader.load(ddl.rollup_table(self.settings, rollup), rows, f"{label}-r{i}")
            total += len(rows)
        return total

    def _reject(
        self,
        spec: DatasourceSpec,
        accepted: pa.Table,
        replaced: Mapping[str, tuple[Any, ...]],
        exc: RowsRejected,
        label: str,
        ranges: Mapping[TP, OffsetRange],
        deltas_loaded: bool,
    ) -> tuple[pa.Table, dict[str, tuple[Any, ...]]]:
        """Rows StarRocks filtered: dead letters with its reason, their deltas taken
        back (where they were loaded), the rest to be loaded again. A key is matched
        by appearing in an ErrorURL line."""
        ds = spec.datasource
        keys = accepted.column(ds.key).to_pylist()
        reasons: dict[str, str] = {}
        for line in exc.reasons:
            for key in keys:
                if key not in reasons and f'"{key}"' in line:
                    reasons[key] = line
        if not reasons:
            raise StoreError(
                f"{exc.message}; the rows it names are not in the batch: {exc.reasons[:3]}"
            )
        bad = pa.array([k in reasons for k in keys])
        rejected = accepted.filter(bad)
        if deltas_loaded:
            back = {k: v for k, v in replaced.items() if k in reasons}
            self._load_deltas(spec, rejected, back, label, sign=-1)
        letters = [
            _row_letter(spec, row, ranges, f"StarRocks filtered the row: {reasons[key][:500]}")
            for key, row in zip(
                rejected.column(ds.key).to_pylist(), rejected.to_pylist(), strict=True
            )
        ]
        self._load_letters(letters, f"{label}-dl")
        rest = {k: v for k, v in replaced.items() if k not in reasons}
        return accepted.filter(pc.invert(bad)), rest

    def _load_writes(
        self, spec: DatasourceSpec, accepted: pa.Table, label: str, now: datetime
    ) -> tuple[int, list[str]]:
        """Per partition the batch wrote: one load, its rows, and how many are late
        (the partition ended more than ``active_window`` ago); returns the late rows
        and the partitions, ascending."""
        if not accepted.num_rows:
            return 0, []
        ds = spec.datasource
        cutoff = now - parse_duration(ds.active_window)
        keys = partitions_of(accepted.column(ds.time), ds.granularity, ds.timezone)
        counts = pc.value_counts(keys).to_pylist()
        rows, late_total = [], 0
        for item in counts:
            part, n = item["values"], item["counts"]
            _start, end = bucket_range(part, ds.granularity, spec.tz)
            late = n if end <= cutoff else 0
            late_total += late
            rows.append(
                {
                    "datasource": spec.name,
                    "partition": part,
                    "loads": 1,
                    "rows": n,
                    "late_rows": late,
                    "last_write_at": ddl.utc_text(now),
                }
            )
        self.loader.load(ddl.WRITES, rows, label)
        return late_total, sorted(r["partition"] for r in rows)

    # --- the outbox -------------------------------------------------------------------

    def _load_letters(self, letters: Sequence[DeadLetterRecord], label: str) -> None:
        rows = [
            {
                "slot": _slot(d.id),
                "id": d.id,
                "datasource": d.datasource,
                "sink": d.sink,
                "topic": d.topic,
                "partition": d.partition,
                "offset": d.offset,
                "key_b64": None if d.key is None else base64.b64encode(d.key).decode(),
                "value_b64": None if d.value is None else base64.b64encode(d.value).decode(),
                "reason": d.reason,
                "failed_at": d.failed_at,
                "published": False,
            }
            for d in letters
        ]
        self.loader.load(ddl.DEAD_LETTERS, rows, label)

    def pending(self, datasource: str) -> list[DeadLetterRecord]:
        cols = [
            "id",
            "datasource",
            "sink",
            "topic",
            "partition",
            "offset",
            "key_b64",
            "value_b64",
            "reason",
            "failed_at",
        ]
        query = (
            exp.select(*(exp.column(c, quoted=True) for c in cols))
            .from_(self._ref(ddl.DEAD_LETTERS))
            .where(
                exp.and_(
                    exp.column("datasource").eq(exp.Literal.string(datasource)),
                    exp.column("published").eq(exp.false()),
                )
            )
            .order_by("topic", "partition", "offset")
        )
        _names, rows = self.sql.execute(query.sql("starrocks"))
        return [
            DeadLetterRecord(
                id=r[0],
                datasource=r[1],
                sink=r[2],
                topic=r[3],
                partition=int(r[4]),
                offset=int(r[5]),
                key=None if r[6] is None else base64.b64decode(r[6]),
                value=None if r[7] is None else base64.b64decode(r[7]),
                reason=r[8],
                failed_at=float(r[9]),
            )
            for r in rows
        ]

    def mark_published(self, published: Sequence[tuple[str, int, int]]) -> None:
        if not published:
            return
        rows = [{"slot": _slot(i), "published": True} for i, _p, _o in published]
        label = f"tally-dlp-{_slot(sorted(published))[:40]}"
        self.loader.load(ddl.DEAD_LETTERS, rows, label, partial_columns=["slot", "published"])

    # --- what the rest of the protocol asks -------------------------------------------

    def datasource_names(self, datasource: str | None = None) -> list[str]:
        specs = [self._spec(datasource)] if datasource else list(self.registry)
        return [n for s in specs for n in (s.name, *(r.name for r in s.rollups))]

    def _figures(
        self, datasource: str | None
    ) -> dict[tuple[str, str], tuple[tuple[Any, ...], tuple[Any, ...]]]:
        """Per (datasource, partition): what it received (loads, rows, late rows,
        last write) and what its last compaction covered (the same sums then, and
        when), from the two bookkeeping tables."""
        writes = exp.select(
            "datasource", "partition", "loads", "rows", "late_rows", "last_write_at"
        ).from_(self._ref(ddl.WRITES))
        seen = exp.select(
            "datasource", "partition", "loads_seen", "rows_seen", "late_rows_seen", "compacted_at"
        ).from_(self._ref(ddl.COMPACTIONS))
        if datasource is not None:
            cond = exp.column("datasource").eq(exp.Literal.string(datasource))
            writes, seen = writes.where(cond), seen.where(cond.copy())
        compacted = {(r[0], r[1]): r[2:] for r in self.sql.execute(seen.sql("starrocks"))[1]}
        return {
            (r[0], r[1]): (r[2:], compacted.get((r[0], r[1]), (0, 0, 0, None)))
            for r in self.sql.execute(writes.sql("starrocks"))[1]
        }

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]:
        """Per partition: loads (each a version of its tablets, what compaction merges)
        and late rows since Tally last asked StarRocks to compact it."""
        return sorted(
            (
                _stats(ds, part, sums, seen)
                for (ds, part), (sums, seen) in self._figures(datasource).items()
            ),
            key=lambda st: (st.datasource, st.partition),
        )

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]:
        """StarRocks owns its files; what the compaction policy needs of "segments" is
        the versions a partition gained since it was last compacted: one per load (a
        Stream Load adds one version to each tablet it writes), the last write's time
        on each but the first, which stands for what the last compaction left."""
        out: list[SegmentInfo] = []
        for st in self.partition_stats(datasource):
            if st.segments <= 0 or st.last_write_at is None:
                continue
            first = st.last_compacted_at or st.last_write_at
            for i in range(st.segments + (1 if st.last_compacted_at else 0)):
                at = first if i == 0 else st.last_write_at
                out.append(
                    SegmentInfo(
                        id=i,
                        datasource=st.datasource,
                        partition=st.partition,
                        path="",
                        rows=st.rows // max(st.segments, 1),
                        bytes=0,
                        seq=i,
                        created_at=at.timestamp(),
                    )
                )
        return out

    def partition_range(self, datasource: str, partition: str) -> tuple[datetime, datetime]:
        spec, rollup = self.registry.owner(datasource)
        granularity = spec.datasource.granularity if rollup is None else rollup.partition
        return bucket_range(partition, granularity, spec.tz)

    def rebuild_rollups(
        self, datasource: str, partition: str | None = None, rollup_name: str | None = None
    ) -> list[RebuildReport]:
        """Make each rollup equal the aggregate of the base table's rows (in one base
        partition, or all): the difference is loaded as deltas, labelled by what it
        corrects, so a rebuild interrupted and repeated never corrects twice."""
        spec = self._spec(datasource)
        reports = []
        for i, rollup in enumerate(spec.rollups):
            if rollup_name is not None and rollup.name != rollup_name:
                continue
            want = self._aggregate_base(spec, rollup, partition)
            have = self._stored_rollup(spec, rollup, partition)
            keys = set(want) | set(have)
            diff = {
                k: tuple(
                    w - h
                    for w, h in zip(
                        want.get(k, _zeros(spec)), have.get(k, _zeros(spec)), strict=True
                    )
                )
                for k in keys
            }
            diff = {k: v for k, v in diff.items() if any(v)}
            report = RebuildReport(rollup.name, partition, groups_repaired=len(diff))
            if diff:
                ordered = sorted(diff.items(), key=lambda kv: str(kv[0]))
                rows = [_rollup_row(spec, rollup, k[0], k[1:], v) for k, v in ordered]
                report.differences = [
                    {"group": [str(x) for x in k], "delta": list(v)} for k, v in ordered[:5]
                ]
                label = f"tally-rb{i}-{_slot(sorted(map(str, diff.items())))[:40]}"
                self.loader.load(ddl.rollup_table(self.settings, rollup), rows, label)
            reports.append(report)
        return reports

    def _aggregate_base(
        self, spec: DatasourceSpec, rollup: Rollup, partition: str | None
    ) -> dict[tuple[Any, ...], tuple[int, ...]]:
        table = self._read_base(spec, partition)
        if not table.num_rows:
            return {}
        signed = signed_states(spec, table.select(list(spec.rollup_state_columns)), [])
        deltas = signed_deltas(spec, rollup, signed)
        names = [m.name for m in spec.parsed_metrics]
        return {
            (r[BUCKET], *(r[d] for d in rollup.dimensions)): tuple(r[n] for n in names)
            for r in deltas.to_pylist()
        }

    def _read_base(self, spec: DatasourceSpec, partition: str | None) -> pa.Table:
        ds = spec.datasource
        query = exp.select(*(exp.column(c, quoted=True) for c in spec.rollup_state_columns)).from_(
            self._ref(ddl.base_table(self.settings, spec))
        )
        if partition is not None:
            pt = ddl.partition_pt(spec, ds.granularity, partition)
            query = query.where(exp.column(ddl.PT, quoted=True).eq(exp.Literal.string(pt)))
        names, rows = self.sql.execute(query.sql("starrocks"))
        schema = pa.schema([row_schema(spec).field(c) for c in spec.rollup_state_columns])
        return pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows], schema=schema)

    def _stored_rollup(
        self, spec: DatasourceSpec, rollup: Rollup, partition: str | None
    ) -> dict[tuple[Any, ...], tuple[int, ...]]:
        names = [m.name for m in spec.parsed_metrics]
        dims = [exp.column(d, quoted=True) for d in (BUCKET, *rollup.dimensions)]
        query = (
            exp.select(
                *dims, *(exp.alias_(exp.Sum(this=exp.column(n, quoted=True)), n) for n in names)
            )
            .from_(self._ref(ddl.rollup_table(self.settings, rollup)))
            .group_by(*dims)
        )
        if partition is not None:
            start, end = bucket_range(partition, spec.datasource.granularity, spec.tz)
            query = query.where(
                exp.and_(
                    exp.GTE(
                        this=exp.column(BUCKET), expression=exp.Literal.string(ddl.utc_text(start))
                    ),
                    exp.LT(
                        this=exp.column(BUCKET), expression=exp.Literal.string(ddl.utc_text(end))
                    ),
                )
            )
        _n, rows = self.sql.execute(query.sql("starrocks"))
        k = 1 + len(rollup.dimensions)
        return {tuple(r[:k]): tuple(int(x) for x in r[k:]) for r in rows}

    def repair(
        self,
        datasource: str,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        remove_keys: Sequence[str] = (),
        *,
        expect: Mapping[str, tuple[int, str] | None] | None = None,
        partitions: Sequence[str] = (),
    ) -> RepairResult:
        raise StoreError("the StarRocks backend does not repair by key yet (capabilities.repair)")

    def close(self) -> None:
        self.loader.close()
        self.sql.close()


class StarRocksCompactor:
    """``ALTER TABLE t COMPACT p``: StarRocks merges a partition's versions (a
    cumulative then base compaction) in the background; the statement only asks."""

    def __init__(self, store: StarRocksStore) -> None:
        self.store = store

    def compact(
        self, datasource: str, partition: str, segment_ids: Sequence[int] | None = None
    ) -> CompactionResult | None:
        st = self.store
        spec, rollup = st.registry.owner(datasource)
        table = ddl.table_of(st.settings, spec, rollup)
        figures = st._figures(datasource).get((datasource, partition))
        if figures is None:
            return None
        sums, seen = figures
        stats = _stats(datasource, partition, sums, seen)
        st.sql.execute(compact_statement(st.settings, table, partition_name(partition)))
        live = self._live_rows(spec, table, partition) if rollup is None else stats.rows
        self._record(datasource, partition, [int(v) for v in sums[:3]])
        return CompactionResult(datasource, partition, stats.segments, stats.rows, live, 0, 0, None)

    def _live_rows(self, spec: DatasourceSpec, table: str, partition: str) -> int:
        st = self.store
        pt = ddl.partition_pt(spec, spec.datasource.granularity, partition)
        query = (
            exp.select(exp.Count(this=exp.Star()))
            .from_(st._ref(table))
            .where(exp.column(ddl.PT, quoted=True).eq(exp.Literal.string(pt)))
        )
        return int(st.sql.execute(query.sql("starrocks"))[1][0][0])

    def _record(self, datasource: str, partition: str, totals: list[int]) -> None:
        """What this compaction covered: the partition's sums (loads, rows, late
        rows) as of now, so its figures since are the sums minus these (labelled by
        them: asked twice, recorded once)."""
        row = {
            "slot": _slot(datasource, partition),
            "datasource": datasource,
            "partition": partition,
            "loads_seen": totals[0],
            "rows_seen": totals[1],
            "late_rows_seen": totals[2],
            "compacted_at": ddl.utc_text(datetime.now(UTC)),
        }
        label = f"tally-compacted-{_slot(datasource, partition, totals)[:40]}"
        self.store.loader.load(ddl.COMPACTIONS, [row], label)

    def pack(self, datasource: str, segment_ids: Sequence[int]) -> CompactionResult | None:
        return None

    def collect_garbage(self, *, orphan_grace_s: float | None = None) -> int:
        return 0


def partition_name(partition: str) -> str:
    """StarRocks' name of an expression partition: ``p`` and the start's digits
    (``2026-11-05`` → ``p20261105``, ``2026-11`` → ``p202611``)."""
    return "p" + re.sub(r"\D", "", partition)


def compact_statement(settings: Settings, table: str, partition: str) -> str:
    """Not expressible as a sqlglot tree: sqlglot keeps ``ALTER TABLE … COMPACT`` as
    an opaque command (tests/storage/starrocks/test_ddl.py shows it round-trips)."""
    return f"ALTER TABLE {ddl.table_ref(settings, table)} COMPACT {ddl.q(partition)}"


# --- row encoding -------------------------------------------------------------------------


def _json_rows(spec: DatasourceSpec, table: pa.Table) -> list[dict[str, Any]]:
    """Base rows as Stream Load's JSON: instants as UTC DATETIME text, and ``_pt``
    from each row's partition (computed once per partition, not per row)."""
    ds = spec.datasource
    if not table.num_rows:
        return []
    parts = partitions_of(table.column(ds.time), ds.granularity, ds.timezone).to_pylist()
    pts = {p: ddl.partition_pt(spec, ds.granularity, p) for p in set(parts)}
    out = []
    for row, part in zip(table.to_pylist(), parts, strict=True):
        for name in spec.timestamps:
            if row[name] is not None:
                row[name] = ddl.utc_text(row[name])
        row[ddl.PT] = pts[part]
        out.append(row)
    return out


def _rollup_row(
    spec: DatasourceSpec,
    rollup: Rollup,
    bucket: datetime,
    dims: Sequence[Any],
    values: Sequence[int],
) -> dict[str, Any]:
    """One Aggregate-table row: the bucket, its rollup partition's ``_pt``, the
    dimensions and a value per metric."""
    row: dict[str, Any] = {
        BUCKET: ddl.utc_text(bucket),
        ddl.PT: ddl.wall(floor(bucket, rollup.partition, spec.tz), spec),
    }
    row |= dict(zip(rollup.dimensions, dims, strict=True))
    row |= {m.name: v for m, v in zip(spec.parsed_metrics, values, strict=True)}
    return row


def _partitions(spec: DatasourceSpec, table: pa.Table) -> list[str]:
    if not table.num_rows:
        return []
    ds = spec.datasource
    keys = partitions_of(table.column(ds.time), ds.granularity, ds.timezone)
    return sorted(set(keys.to_pylist()))


def _row_letter(
    spec: DatasourceSpec, row: Mapping[str, Any], ranges: Mapping[TP, OffsetRange], reason: str
) -> DeadLetterRecord:
    """A dead letter for a decoded row StarRocks cannot hold (its source offset is not
    known here: the batch's first partition stands for it, offset -1)."""
    ds = spec.datasource
    topic, partition = next(iter(ranges), ("", 0))
    return DeadLetterRecord(
        id=f"{spec.name}:{topic}:{partition}:row:{row[ds.key][:200]}:{row[ds.event_id]}",
        datasource=spec.name,
        sink="olap",
        topic=topic,
        partition=partition,
        offset=-1,
        key=str(row[ds.key]).encode(),
        value=orjson.dumps(row, default=str),
        reason=reason,
        failed_at=datetime.now(UTC).timestamp(),
    )


def _stats(
    datasource: str, partition: str, sums: Sequence[Any], seen: Sequence[Any]
) -> PartitionStats:
    loads, rows, late, last = sums
    l_seen, r_seen, late_seen, at = seen
    return PartitionStats(
        datasource=datasource,
        partition=partition,
        segments=int(loads) - int(l_seen),
        rows=int(rows) - int(r_seen),
        bytes=0,
        late_rows=int(late) - int(late_seen),
        last_write_at=last,
        last_compacted_at=at,
    )


def _split_oversized(
    spec: DatasourceSpec, table: pa.Table, ranges: Mapping[TP, OffsetRange]
) -> tuple[pa.Table, list[DeadLetterRecord]]:
    """Rows a generated table cannot hold: a key, tenant or rollup dimension longer
    than its VARCHAR(128) (StarRocks' primary and sort key limit). Refused here, as
    dead letters naming the column, before any delta is planned from them; anything
    else StarRocks filters is met at the base load (``_reject``)."""
    ds = spec.datasource
    limit = ddl.KEY_BYTES
    capped = [ds.key, ds.tenant, *(d for r in spec.rollups for d in r.dimensions)]
    capped = [c for c in dict.fromkeys(capped) if spec.columns[c].type == "string"]
    if not table.num_rows:
        return table, []
    bad = None
    for column in capped:
        long = pc.greater(pc.fill_null(pc.binary_length(table.column(column)), 0), limit)
        bad = long if bad is None else pc.or_(bad, long)
    if bad is None or not pc.any(bad).as_py():
        return table, []
    letters = []
    for row in table.filter(bad).to_pylist():
        column = next(c for c in capped if len((row[c] or "").encode()) > limit)
        size = len(row[column].encode())
        reason = f"{column} is {size} bytes; StarRocks' key columns hold {limit}"
        letters.append(_row_letter(spec, row, ranges, reason))
    return table.filter(pc.invert(bad)), letters


def _rows_digest(spec: DatasourceSpec, table: pa.Table) -> str:
    ds = spec.datasource
    ident = zip(
        table.column(ds.key).to_pylist(),
        table.column(ds.version).to_pylist(),
        table.column(ds.event_id).to_pylist(),
        strict=True,
    )
    return hashlib.sha1(orjson.dumps(sorted(ident))).hexdigest()


def _zeros(spec: DatasourceSpec) -> tuple[int, ...]:
    return (0,) * len(spec.parsed_metrics)


__all__ = ["StarRocksStore", "batch_label"]

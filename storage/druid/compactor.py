"""Tally's compaction of Druid time chunks (the watcher's compactor on Druid, ADR 0007).

Druid's own auto-compaction scans every 30 minutes and yields to ingestion locks; a
cancellation landing in a 30-day-old day would leave that day fragmented for hours.
Here the watcher sees the late write within a second (a streaming task announces a
realtime segment for the old chunk in ``sys.segments``) and this compactor:

1. asks the supervisor for an **early handoff** of its task groups (at most once per
   ``druid.handoff_interval_s`` per supervisor), because a compaction reads published
   segments only; until the late segment is in the metadata store's used set, the
   chunk's compaction is a ``CompactionConflict`` (planned afresh next poll);
2. submits a native ``compact`` task over exactly the chunk's visible segments (a
   ``segments`` inputSpec: Druid fails the task if the used set changed meanwhile,
   an optimistic check), with the generated dimensions and metrics (so the task does
   not read every segment first) and ``useConcurrentLocks``: a REPLACE lock that
   streaming tasks' APPEND locks (the supervisors set the same flag) never revoke,
   and rows appended meanwhile are upgraded into the new version, not lost;
3. waits for the task, then for the broker to serve the new version; a failed task
   (lock lost, segments changed) is a conflict, retried on a later poll after an
   exponential backoff per chunk.

A chunk still written by ingestion (inside the active window) is compacted as it is,
realtime segments left appended; no handoff is asked for it.

Druid chunks are UTC (Kafka ingestion takes simple granularities only, see
``storage.druid.supervisor``): a partition here is a UTC chunk, named like Tally's
partition keys in UTC (``2026-11-02``, ``2026-11-02T05``, ``2026-11``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlglot import exp

from storage.druid import dialect
from storage.druid import segments as seg
from storage.druid.broker import Broker
from storage.druid.overlord import Coordinator, Tasks
from storage.druid.sqlgen import time_range
from storage.druid.supervisor import (
    datasource_name,
    rollup_datasource_name,
    rollup_supervisor_spec,
    supervisor_spec,
)
from storage.protocol import CompactionResult, PartitionStats, SegmentInfo
from tally.errors import CompactionConflict, StoreError, StoreUnavailable
from tally.settings import Settings
from tally.specs import SpecRegistry
from tally.timeutil import Granularity, bucket_key, bucket_range, parse_duration

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
REASK_S = 30.0  # a handoff not done with its segments by then is asked for again
_UTC = ZoneInfo("UTC")


@dataclass(frozen=True)
class Target:
    """One Druid datasource Tally compacts: a spec's base or one of its rollups."""

    name: str  # Tally's
    druid: str  # Druid's datasource, also its supervisor's id
    granularity: Granularity  # its segment granularity (UTC chunks)
    window: timedelta  # the spec's active window
    schema: dict[str, Any]  # the supervisor's dataSchema
    task_groups: int  # the supervisor's taskCount

    def key(self, start: datetime) -> str:
        return bucket_key(start, self.granularity, _UTC)

    def chunk(self, partition: str) -> tuple[datetime, datetime]:
        return bucket_range(partition, self.granularity, _UTC)


def targets(settings: Settings, registry: SpecRegistry) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for spec in registry:
        window = parse_duration(spec.datasource.active_window)
        bodies = [
            (
                spec.name,
                datasource_name(settings, spec),
                spec.datasource.granularity,
                supervisor_spec(settings, spec),
            )
        ]
        for rollup in spec.rollups:
            body = rollup_supervisor_spec(settings, spec, rollup)
            bodies.append(
                (rollup.name, rollup_datasource_name(settings, rollup), rollup.partition, body)
            )
        for name, druid, granularity, body in bodies:
            inner = body["spec"]
            out[name] = Target(
                name,
                druid,
                granularity,
                window,
                inner["dataSchema"],
                int(inner["ioConfig"]["taskCount"]),
            )
    return out


def compaction_spec(target: Target, task_id: str, segment_ids: Sequence[str]) -> dict[str, Any]:
    """A native ``compact`` task over exactly ``segment_ids`` (one chunk)."""
    schema = target.schema
    granularity = schema["granularitySpec"]
    return {
        "type": "compact",
        "id": task_id,
        "dataSource": target.druid,
        "ioConfig": {
            "type": "compact",
            "inputSpec": {"type": "segments", "segments": list(segment_ids)},
        },
        "dimensionsSpec": schema["dimensionsSpec"],
        "metricsSpec": schema["metricsSpec"],
        "granularitySpec": {
            "segmentGranularity": granularity["segmentGranularity"],
            "queryGranularity": granularity["queryGranularity"],
            "rollup": granularity["rollup"],
        },
        "tuningConfig": {
            "type": "index_parallel",
            # One sequential task: one slot, and clear of apache/druid#18099 (a
            # parallel REPLACE on 33.0.0 could take an epoch lock and write nothing).
            "maxNumConcurrentSubTasks": 1,
            "partitionsSpec": {"type": "dynamic", "maxRowsPerSegment": 5_000_000},
        },
        "context": {"useConcurrentLocks": True},
    }


def inline_task(
    schema: dict[str, Any],
    values: Sequence[bytes],
    *,
    task_id: str | None = None,
    interval: str | None = None,
) -> dict[str, Any]:
    """A native batch task over inline refined rows with ``schema`` (a supervisor's
    dataSchema): appended, or with ``interval`` replacing that one chunk (existing
    segments dropped, a REPLACE lock beside the streaming tasks' APPEND locks:
    ``tally verify --repair``'s reindex)."""
    io: dict[str, Any] = {
        "type": "index_parallel",
        "inputSource": {"type": "inline", "data": b"\n".join(values).decode()},
        "inputFormat": {"type": "json"},
        "appendToExisting": interval is None,
    }
    task: dict[str, Any] = {"type": "index_parallel"}
    if interval is not None:
        schema = schema | {"granularitySpec": schema["granularitySpec"] | {"intervals": [interval]}}
        io["dropExisting"] = True
        task["context"] = {"useConcurrentLocks": True}
    if task_id is not None:
        task["id"] = task_id
    task["spec"] = {
        "dataSchema": schema,
        "ioConfig": io,
        "tuningConfig": {"type": "index_parallel", "maxNumConcurrentSubTasks": 1},
    }
    return task


class DruidCompactor:
    """Lists Druid's chunks for the watcher and compacts one chunk at a time (several
    callers may compact different chunks at once: the watcher's workers)."""

    def __init__(
        self,
        settings: Settings,
        registry: SpecRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.targets = targets(settings, registry)
        self._by_druid = {t.druid: t for t in self.targets.values()}
        self.broker = Broker(settings.druid.broker_url, timeout_s=settings.druid.request_timeout_s)
        self.tasks = Tasks(settings)
        self.coordinator = Coordinator(settings)
        self.clock = clock
        self.monotonic = time.monotonic  # the retry backoff's clock
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}  # Druid segment id → when this process saw it
        self._numbers: dict[str, int] = {}  # Druid segment id → SegmentInfo.id
        # supervisor → (last early handoff, monotonic; the segments it was asked for)
        self._handoff_at: dict[str, tuple[float, frozenset[str]]] = {}
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}  # → (count, retry at)

    def target(self, name: str) -> Target:
        if name not in self.targets:
            raise StoreError(f"unknown datasource {name!r}; known: {sorted(self.targets)}")
        return self.targets[name]

    # --- listing -------------------------------------------------------------------------

    def chunks(
        self, datasource: str | None = None, start: datetime | None = None
    ) -> dict[tuple[str, str], list[seg.Segment]]:
        """(Tally name, partition) → the chunk's served or published segments, as the
        broker's ``sys.segments`` lists them (published state lags by the coordinator's
        ``pollDuration``; realtime segments appear within a second)."""
        wanted = [self.target(datasource)] if datasource else list(self.targets.values())
        names = [exp.Literal.string(t.druid) for t in wanted]
        where = exp.and_(
            exp.column("datasource").isin(*names),
            exp.or_(exp.column("is_active").eq(1), exp.column("is_realtime").eq(1)),
        )
        if start is not None:
            where = exp.and_(
                where, exp.column("start", quoted=True).eq(exp.Literal.string(_iso(start)))
            )
        query = exp.select(*seg.COLUMNS).from_("sys.segments").where(where)
        _names, _types, rows = self.broker.sql(query.sql(dialect=dialect.NAME))
        out: dict[tuple[str, str], list[seg.Segment]] = {}
        now = self.clock()
        with self._lock:
            for row in rows:
                s = seg.from_row(row)
                t = self._by_druid.get(s.datasource)
                if t is None:
                    continue
                self._first_seen.setdefault(s.id, now)
                self._numbers.setdefault(s.id, len(self._numbers) + 1)
                out.setdefault((t.name, t.key(s.start)), []).append(s)
        return out

    def partition_stats(self, datasource: str | None = None) -> list[PartitionStats]:
        out = []
        for (name, partition), chunk in sorted(self.chunks(datasource).items()):
            groups = seg.units(chunk)
            if not groups:
                continue
            first = groups[0]
            compacted = first[0].compacted and first[0].in_core
            newest = max(min(self._seen(s) for s in g) for g in groups)
            out.append(
                PartitionStats(
                    datasource=name,
                    partition=partition,
                    segments=len(groups),
                    rows=sum(s.rows for g in groups for s in g),
                    bytes=sum(s.bytes for g in groups for s in g),
                    late_rows=sum(s.rows for g in groups[1:] for s in g) if compacted else 0,
                    last_write_at=datetime.fromtimestamp(newest, UTC),
                    last_compacted_at=first[0].version_at if compacted else None,
                )
            )
        return out

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]:
        """One SegmentInfo per unit (``storage.druid.segments.units``): ``path`` is
        the unit's first Druid segment id, ``created_at`` when this process first saw
        it, ``sealed`` false while a streaming task still holds it."""
        out = []
        for (name, partition), chunk in sorted(self.chunks(datasource).items()):
            for i, group in enumerate(seg.units(chunk)):
                head = group[0]
                out.append(
                    SegmentInfo(
                        id=self._numbers[head.id],
                        datasource=name,
                        partition=partition,
                        path=head.id,
                        rows=sum(s.rows for s in group),
                        bytes=sum(s.bytes for s in group),
                        seq=i,
                        created_at=min(self._seen(s) for s in group),
                        sealed=all(s.published for s in group),
                    )
                )
        return out

    def _seen(self, s: seg.Segment) -> float:
        with self._lock:
            return self._first_seen.get(s.id, self.clock())

    # --- the Compactor protocol ----------------------------------------------------------

    def compact(
        self, datasource: str, partition: str, segment_ids: Sequence[int] | None = None
    ) -> CompactionResult | None:
        """Compact the chunk to one segment set now; None if it already is one.
        ``segment_ids`` (the watcher's plan) is not needed: the task names the chunk's
        segments as the metadata store holds them now, and Druid checks that set."""
        target = self.target(datasource)
        start, end = target.chunk(partition)
        self._backing_off(datasource, partition)
        used = [
            s
            for s in map(
                seg.from_metadata,
                self.coordinator.used_segments(target.druid, f"{_iso(start)}/{_iso(end)}"),
            )
            if s.start == start
        ]
        served = self.chunks(datasource, start).get((datasource, partition), [])
        late = end <= datetime.now(UTC) - target.window
        pending = seg.unsealed(served, (s.id for s in used))
        if late and pending:
            asked = self._handoff(target, {s.id for s in pending})
            raise CompactionConflict(
                f"{datasource}/{partition}: {len(pending)} segment(s) still held by a"
                f" streaming task; {'early handoff asked' if asked else 'handoff under way'},"
                " compacted once published"
            )
        current = seg.visible(used)
        if not current or seg.one_set(current):
            return None
        rows_in = self._rows(target, start, end)
        task_id = f"tally_compact_{target.druid}_{partition}_{uuid.uuid4().hex[:8]}"
        self.tasks.submit(compaction_spec(target, task_id, [s.id for s in current]))
        log.info("submitted %s over %d segments", task_id, len(current))
        status = self._wait(task_id)
        if status.get("status") != "SUCCESS":
            self._failed(datasource, partition)
            raise CompactionConflict(
                f"{datasource}/{partition}: task {task_id} {status.get('status')}:"
                f" {status.get('errorMsg') or 'no reason given'}; retried later"
            )
        self._failures.pop((datasource, partition), None)
        out = self._served_after(target, start, {s.version for s in current})
        return CompactionResult(
            datasource=datasource,
            partition=partition,
            replaced_segments=len(current),
            # Rows the chunk serves before and after (COUNT(*): sys.segments' num_rows
            # lags by the broker's metadata refresh); rows appended meanwhile count.
            rows_in=rows_in,
            rows_out=self._rows(target, start, end) if out else rows_in,
            bytes_in=sum(s.bytes for s in current),
            bytes_out=sum(s.bytes for s in out),
            segment_id=None,
        )

    def seal(self, datasource: str, partition: str, timeout_s: float = 180.0) -> None:
        """Return once every segment of the chunk is published (early handoffs asked
        meanwhile): a REPLACE of the chunk then covers every row it holds."""
        target = self.target(datasource)
        start, end = target.chunk(partition)
        deadline = time.monotonic() + timeout_s
        while True:
            used = self.coordinator.used_segments(target.druid, f"{_iso(start)}/{_iso(end)}")
            served = self.chunks(datasource, start).get((datasource, partition), [])
            ids = [str(s["identifier"]) for s in used]
            if not seg.unsealed(served, ids):
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"{datasource}/{partition}: not handed off in {timeout_s:g} s"
                )
            self._handoff(target, {s.id for s in seg.unsealed(served, ids)})
            time.sleep(0.5)

    def replace(self, datasource: str, partition: str, values: Sequence[bytes]) -> None:
        """Replace the chunk's rows with ``values`` (refined-format rows) by a native
        batch task under a REPLACE lock; returns once the broker serves the result."""
        target = self.target(datasource)
        start, end = target.chunk(partition)
        replaced = {
            s.version for s in self.chunks(datasource, start).get((datasource, partition), [])
        }
        task_id = f"tally_reindex_{target.druid}_{partition}_{uuid.uuid4().hex[:8]}"
        interval = f"{_iso(start)}/{_iso(end)}"
        self.tasks.submit(inline_task(target.schema, values, task_id=task_id, interval=interval))
        status = self._wait(task_id)
        if status.get("status") != "SUCCESS":
            raise StoreError(
                f"{datasource}/{partition}: reindex {task_id} {status.get('status')}:"
                f" {status.get('errorMsg') or 'no reason given'}"
            )
        self._served_after(target, start, replaced)

    def pack(self, datasource: str, segment_ids: Sequence[int]) -> CompactionResult | None:
        raise StoreError("the Druid backend has no packs (capabilities.packs is false)")

    def collect_garbage(self, *, orphan_grace_s: float | None = None) -> int:
        """Nothing of Tally's: the coordinator marks overshadowed segments unused, and
        deleting them from deep storage is Druid's kill task (an operator's choice)."""
        return 0

    # --- the steps -----------------------------------------------------------------------

    def _handoff(self, target: Target, pending: set[str]) -> bool:
        """Early handoff of the target's supervisor for ``pending`` segments, unless
        one was asked within ``handoff_interval_s``, or was asked for these same
        segments less than ``REASK_S`` ago: that handoff is still publishing them, and
        asking again would only cut the successor task short."""
        now = time.monotonic()
        with self._lock:
            last, asked_for = self._handoff_at.get(target.druid, (None, frozenset()))
            if last is not None and (
                now - last < self.settings.druid.handoff_interval_s
                or (pending <= asked_for and now - last < REASK_S)
            ):
                return False
            self._handoff_at[target.druid] = (now, frozenset(pending))
        self.tasks.handoff(target.druid, list(range(target.task_groups)))
        log.info("asked %s for an early handoff", target.druid)
        return True

    def _wait(self, task_id: str) -> dict[str, Any]:
        """The task's final status; shut down (and FAILED) past the timeout."""
        deadline = time.monotonic() + self.settings.compaction.task_timeout_s
        while True:
            status = self.tasks.status(task_id)
            if status is not None and status.get("status") in ("SUCCESS", "FAILED"):
                return status
            if time.monotonic() > deadline:
                self.tasks.shutdown(task_id)
                return {"status": "FAILED", "errorMsg": "timed out; shut down"}
            time.sleep(0.5)

    def _served_after(
        self, target: Target, start: datetime, replaced: set[str]
    ) -> list[seg.Segment]:
        """The chunk's segments of the new version once the broker serves them (a
        historical has loaded them), or [] after a minute."""
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                chunk = self.chunks(target.name, start).get((target.name, target.key(start)), [])
            except StoreUnavailable:
                chunk = []
            newer = [s for s in chunk if s.published and s.version not in replaced]
            if newer and all(s.available for s in newer if s.in_core):
                return [s for s in newer if s.in_core]
            time.sleep(0.5)
        log.warning("%s %s: compacted, not served by the broker within 60 s", target.druid, start)
        return []

    def _rows(self, target: Target, start: datetime, end: datetime) -> int:
        table = exp.Table(this=exp.to_identifier(target.druid, quoted=True))
        query = (
            exp.select(exp.Count(this=exp.Star()))
            .from_(table)
            .where(exp.and_(*time_range(start, end)))
        )
        _n, _t, rows = self.broker.sql(query.sql(dialect=dialect.NAME))
        return int(rows[0][0]) if rows else 0

    def _backing_off(self, datasource: str, partition: str) -> None:
        count, retry_at = self._failures.get((datasource, partition), (0, 0.0))
        if count and self.monotonic() < retry_at:
            raise CompactionConflict(
                f"{datasource}/{partition}: {count} failed compaction(s); next try in"
                f" {retry_at - self.monotonic():.0f} s"
            )

    def _failed(self, datasource: str, partition: str) -> None:
        count, _ = self._failures.get((datasource, partition), (0, 0.0))
        delay = min(MAX_BACKOFF_S, 2.0**count)
        self._failures[(datasource, partition)] = (count + 1, self.monotonic() + delay)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

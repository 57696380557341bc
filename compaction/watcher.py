"""The compaction watcher: poll partition statistics, compact what the policy says.

It never blocks ingestion: compaction reads immutable segments and swaps them in one
short catalog transaction; segments committed meanwhile stay live. Work is bounded per
poll (``compaction.max_bytes_per_tick``), late partitions go first, and replaced files
are deleted once the grace period has passed. Several watchers may run: a task whose
segments another one replaced first fails its swap harmlessly and is planned afresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from compaction import metrics
from compaction.policy import Done, PolicyConfig, Task, ended_before, plan
from storage.protocol import OlapStore
from tally.errors import CompactionConflict, TallyError
from tally.settings import Settings
from tally.specs import SpecRegistry
from tally.timeutil import Granularity, bucket_key, bucket_range, parse_duration

log = logging.getLogger(__name__)


@dataclass
class WatchReport:
    ticks: int = 0
    compactions: int = 0
    conflicts: int = 0
    bytes_rewritten: int = 0
    files_removed: int = 0
    done: list[Done] = field(default_factory=list)


def policy_config(settings: Settings) -> PolicyConfig:
    c = settings.compaction
    return PolicyConfig(
        debounce_s=c.debounce_s,
        pack_delay_s=c.pack_delay_s,
        pack_max_files=c.pack_max_files,
        max_delay_s=c.max_delay_s,
        min_merge=c.min_merge,
        max_merge=c.max_merge,
        tier_ratio=c.tier_ratio,
    )


def pack_units(registry: SpecRegistry) -> Callable[[str, str], str | None]:
    """``(datasource, partition) → pack`` it belongs in: the month of a day partition,
    the day of an hour partition; None for month partitions and for rollups."""
    coarser: dict[Granularity, Granularity] = {"hour": "day", "day": "month"}
    shapes = {
        spec.name: (spec.datasource.granularity, coarser[spec.datasource.granularity], spec.tz)
        for spec in registry
        if spec.datasource.granularity in coarser
    }

    def unit_of(datasource: str, partition: str) -> str | None:
        shape = shapes.get(datasource)
        if shape is None:
            return None
        granularity, unit, tz = shape
        return bucket_key(bucket_range(partition, granularity, tz)[0], unit, tz)

    return unit_of


def window_test(registry: SpecRegistry) -> Callable[[str, str, datetime], bool]:
    """``(datasource, partition, now) → ended before the active window?`` for base and
    rollup datasources alike (a rollup partitions by its own granularity)."""
    shapes: dict[str, tuple[Granularity, ZoneInfo, timedelta]] = {}
    for spec in registry:
        window = parse_duration(spec.datasource.active_window)
        shapes[spec.name] = (spec.datasource.granularity, spec.tz, window)
        for rollup in spec.rollups:
            shapes[rollup.name] = (rollup.partition, spec.tz, window)

    def ended_before_window(datasource: str, partition: str, now: datetime) -> bool:
        granularity, tz, window = shapes[datasource]
        _, end = bucket_range(partition, granularity, tz)
        return ended_before(end, now, window)

    return ended_before_window


class Watcher:
    def __init__(
        self,
        settings: Settings,
        registry: SpecRegistry,
        store: OlapStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.config = policy_config(settings)
        self._old = window_test(registry)
        caps = store.capabilities
        # Packing is the embedded engine's; an engine without it keeps a file per partition.
        self._unit_of = pack_units(registry) if caps.packs else lambda _d, _p: None
        self._manual = caps.manual_compaction
        self.report = WatchReport()

    def due(self, datasource: str | None = None) -> list[Task]:
        """What to compact now; nothing where the engine compacts by itself."""
        if not self._manual:
            return []
        now = self.clock()
        stats = self.store.partition_stats(datasource)
        segments = self.store.live_segments(datasource)
        tasks = plan(
            stats, segments, now, lambda d, p: self._old(d, p, now), self.config, self._unit_of
        )
        metrics.record_due(tasks, self.store.datasource_names(datasource))
        return tasks

    def tick(self, datasource: str | None = None) -> list[Done]:
        """One poll: run due tasks in order until the byte budget is spent, then GC."""
        self.report.ticks += 1
        budget = self.settings.compaction.max_bytes_per_tick
        finished: list[Done] = []
        for task in self.due(datasource):
            if finished and task.bytes > budget:
                break
            done = self.run_task(task)
            if done is not None:
                finished.append(done)
                budget -= task.bytes
        removed = self.store.compactor.collect_garbage()
        self.report.files_removed += removed
        metrics.removed.inc(removed)
        return finished

    def run_task(self, task: Task) -> Done | None:
        log.info(
            "compacting %s/%s (%s): %d segments, %d bytes",
            task.datasource,
            task.partition,
            task.kind,
            len(task.segment_ids),
            task.bytes,
        )
        try:
            if task.kind == "pack":
                result = self.store.compactor.pack(task.datasource, task.segment_ids)
            else:
                result = self.store.compactor.compact(
                    task.datasource, task.partition, task.segment_ids
                )
        except CompactionConflict as exc:
            self.report.conflicts += 1
            metrics.conflicts.inc()
            log.info("compaction skipped, planned afresh next poll: %s", exc)
            return None
        done = Done(task, result, self.clock())
        metrics.record_done(done)
        self.report.compactions += 1
        self.report.bytes_rewritten += result.bytes_in if result else 0
        self.report.done.append(done)
        del self.report.done[:-1000]
        log.info(
            "compacted %s/%s (%s): %d segments → 1, %d bytes",
            task.datasource,
            task.partition,
            task.kind,
            len(task.segment_ids),
            task.bytes,
        )
        return done

    def run(
        self, stop: threading.Event, on_done: Callable[[Sequence[Done]], None] | None = None
    ) -> WatchReport:
        """Poll until ``stop`` is set; a failing poll is logged and retried."""
        interval = self.settings.compaction.interval_s
        while not stop.is_set():
            try:
                finished = self.tick()
            except TallyError as exc:
                log.warning("compaction poll failed, retrying: %s", exc)
                finished = []
            if on_done is not None and finished:
                on_done(finished)
            if not finished:
                stop.wait(interval)
        return self.report

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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from compaction import metrics
from compaction.journal import Journal
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


def window_test(registry: SpecRegistry, store: OlapStore) -> Callable[[str, str, datetime], bool]:
    """``(datasource, partition, now) → ended before the active window?`` for base and
    rollup datasources alike, a partition's bounds as the store has them (a rollup
    partitions by its own granularity; Druid's chunks are UTC)."""
    windows: dict[str, timedelta] = {}
    for spec in registry:
        window = parse_duration(spec.datasource.active_window)
        windows[spec.name] = window
        for rollup in spec.rollups:
            windows[rollup.name] = window

    def ended_before_window(datasource: str, partition: str, now: datetime) -> bool:
        _, end = store.partition_range(datasource, partition)
        return ended_before(end, now, windows[datasource])

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
        caps = store.capabilities
        self.config = replace(policy_config(settings), whole_partitions=not caps.partial_compaction)
        self._old = window_test(registry, store)
        # Packing is the embedded engine's; an engine without it keeps a file per partition.
        self._unit_of = pack_units(registry) if caps.packs else lambda _d, _p: None
        self._manual = caps.manual_compaction
        self.report = WatchReport()
        # An engine's compaction is a task it runs: several may be in flight while
        # polls go on (each in a worker that waits for its task); Tally's own
        # compactions run in the polling thread, one after another.
        self._pool = (
            ThreadPoolExecutor(settings.compaction.max_in_flight, "compaction")
            if caps.compacts_in_engine
            else None
        )
        self._in_flight: dict[tuple[str, str], Future[Done | None]] = {}
        self.journal = Journal(settings.compaction_journal_path)

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
        """One poll: run due tasks in order until the byte budget is spent, then GC.
        Where the engine runs compactions, start due ones instead (at most
        ``max_in_flight``, one per partition) and return those that finished."""
        self.report.ticks += 1
        if self._pool is not None:
            return self._tick_in_engine(self._pool, datasource)
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

    def _tick_in_engine(self, pool: ThreadPoolExecutor, datasource: str | None) -> list[Done]:
        finished = [d for d in self.harvest() if d is not None]
        room = self.settings.compaction.max_in_flight - len(self._in_flight)
        for task in self.due(datasource):
            key = (task.datasource, task.partition)
            if room <= 0:
                break
            if key in self._in_flight:
                continue
            self._in_flight[key] = pool.submit(self.run_task, task)
            room -= 1
        metrics.in_flight.set(len(self._in_flight))
        return finished

    def harvest(self) -> list[Done | None]:
        """Results of the in-flight compactions that ended (a failed one is logged:
        the partition is planned afresh at the next poll)."""
        out: list[Done | None] = []
        for key, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            try:
                out.append(future.result())
            except TallyError as exc:
                log.warning("compaction of %s/%s failed, planned afresh: %s", *key, exc)
                out.append(None)
        return out

    def drain(self) -> list[Done]:
        """Wait for every in-flight compaction; their results."""
        for future in list(self._in_flight.values()):
            wait([future])
        return [d for d in self.harvest() if d is not None]

    def run_task(self, task: Task) -> Done | None:
        started = self.clock()
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
        done = Done(task, result, self.clock(), started)
        metrics.record_done(done)
        try:
            self.journal.record(done)
        except TallyError as exc:  # history only: never fail a compaction that was done
            log.warning("%s", exc)
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
        if self._pool is not None:
            finished = self.drain()
            if on_done is not None and finished:
                on_done(finished)
            self._pool.shutdown()
        return self.report

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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from compaction import metrics
from compaction.journal import Journal
from compaction.policy import Done, PolicyConfig, Task, ended_before, plan
from storage.protocol import Damage, OlapStore
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
        self.registry = registry
        self.damage: list[Damage] = []
        self._checked_at = self._digests_at = float("-inf")

    def check_files(self) -> list[Damage]:
        """Sizes every ``check_files_s``, digests every ``check_digests_s``: damage is
        recorded (readers leave it out), shown as a metric, and with ``repair_damaged``
        rebuilt from the log (a partition the log no longer holds whole stays listed)."""
        c = self.settings.compaction
        now = time.monotonic()
        if not self.store.capabilities.checks_files or now - self._checked_at < c.check_files_s:
            return self.damage
        full = now - self._digests_at >= c.check_digests_s
        self._checked_at = now
        if full:
            self._digests_at = now
        self.damage = self.store.check_files(full=full, found_by="watcher")
        if self.damage and c.repair_damaged:
            self._restore()
        metrics.record_damage([(d.datasource, d.partition) for d in self.damage])
        return self.damage

    def _restore(self) -> None:
        from compaction.damage import of_spec, restore_damaged
        from search import open_index

        for spec in self.registry:
            mine = of_spec(spec, self.damage)
            if not mine:
                continue
            index = open_index(self.settings, spec, readonly=True)
            try:
                done = restore_damaged(self.settings, self.store, spec, mine, index=index)
            finally:
                index.close()
            metrics.restored.labels(spec.name).inc(len(done.restored))
            for loss in done.lost:
                log.error(
                    "%s partition %s not rebuilt: the log no longer holds all of it (%d key(s)"
                    " known lost); tally verify --repair --accept-loss rebuilds what it holds",
                    spec.name,
                    loss.partition,
                    len(loss.keys),
                )
            if done.restored:
                log.info("rebuilt from the log: %s", ", ".join(done.restored))
        self.damage = self.store.check_files(full=False, found_by="watcher")

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
        if self.damage:  # a damaged file cannot be read: never compacted, restored instead
            bad = {d.path for d in self.damage}
            ids = {s.id for s in segments if s.path in bad}
            tasks = [t for t in tasks if not ids & set(t.segment_ids)]
        metrics.record_due(tasks, self.store.datasource_names(datasource))
        return tasks

    def tick(self, datasource: str | None = None) -> list[Done]:
        """One poll: run due tasks in order until the byte budget is spent, then GC.
        Where the engine runs compactions, start due ones instead (at most
        ``max_in_flight``, one per partition) and return those that finished."""
        self.report.ticks += 1
        self.check_files()
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

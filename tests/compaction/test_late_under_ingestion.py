"""During continuous ingestion, late cancellations into partitions 30 days old: the watcher
compacts each affected partition back to one segment while ingestion goes on (how soon
is measured by ``bench/compaction.py``, never asserted here), rollups stay exact, no row
is lost, and queries running during compaction return correct results.

Everything is real: the broker (the development broker, then Apache Kafka), the OLAP
sink consuming it
(``run_ingest`` in a thread: a commit every ~100–250 ms), the store in a temporary
data directory, the :class:`~compaction.watcher.Watcher` with its real clock
(``run(stop)``, polling every 0.2 s, default debounce 1 s / max delay 5 s), and a
reader querying the merged view and both rollups back to back.

* A publisher thread sends new payments approved "now" every 150 ms (plus a
  cancellation of a recent one) and, at known moments, cancellations of payments
  approved 30, 31 and 32 days ago (that history was ingested first and compacted
  to one segment per day): single bursts, one burst into two days, second
  cancellations of canceled payments, and one day written every 0.5 s for 5 s
  (the ``max_delay_s`` path). It keeps the partition and offset of every
  acknowledged event.
* A monitor polls ``partition_stats`` — one SQLite statement, so a partition's
  segment count and last write time come from one snapshot. Each distinct last
  write time of an old base partition is a late write (a commit's time). That
  partition, and each old rollup (month) partition it feeds, is done for that
  write at the first poll showing the write *and* a single segment; every late
  write must get there before the run ends (the latencies are reported, not bounded).
* The reader reads the catalog's generation and stored offsets in one transaction,
  then runs ONE statement on a cursor pinned to one generation: a fingerprint of
  the merged view (rows, distinct keys, sums, per-status counts, each old day's
  totals), of both rollups (groups, metric sums) and the number of rollup groups
  that differ from the rollup recomputed from the merged view in that statement.
  When the cursor's generation equals the one read with the offsets, the state
  is "every event below those offsets" (a commit moves offsets and generation in
  one transaction; a compaction or pack moves only the generation and must not
  change the answer; a commit that writes nothing changes no answer, and under
  the same latest-version rule no expected state either), so the fingerprint must
  equal the naive reference over that prefix of the log. Other observations (a
  commit slipped in between the two reads) must still be internally consistent.
  At least one checked observation must overlap a late compaction.
* At the end, the merged view row by row and both rollups group by group equal the
  reference over everything published, and every live segment file exists.

What it does not prove: that a crash mid-compaction is harmless (see
``test_watcher_crash.py``); how soon, on a slower or busier machine, or with
much larger partitions (here a partition compacts in tens of milliseconds); that a
query overlapped the catalog swap itself rather than some part of a compaction;
other layouts (hour partitions, rollup partitions still hot); several watchers.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from compaction.policy import Done, Task
from compaction.watcher import Watcher, window_test
from ingest.kafka import ensure_topics, flush, producer
from ingest.runner import RunReport
from ingest.service import run_ingest
from producers.generate import rfc3339
from storage.embedded.catalog import Catalog
from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from tally.settings import CompactionSettings, IngestSettings, Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import floor
from tests.brokers import Broker
from tests.factories import METHODS, latest_by_key, normalise, payment, reference_rollup

pytestmark = pytest.mark.slow

SEOUL = ZoneInfo("Asia/Seoul")
OLD_DAYS = (30, 31, 32)  # days before today (Seoul) whose payments are canceled late
HISTORY_PER_DAY = 400
MERCHANTS = tuple(f"m{i}" for i in range(5))
TICK_S = 0.15  # the publisher's cadence
NEW_PER_TICK = 20  # new payments approved "now" per tick
SETTLE_S = 40.0  # after the last late burst, how long the watcher may take (a deadline)
ROLLUPS = ("payments_hourly", "payments_daily")

# (seconds after the steady phase began, index into OLD_DAYS, payments to cancel)
LATE_SCHEDULE: tuple[tuple[float, int, int], ...] = (
    (1.0, 0, 12),
    (2.0, 1, 12),
    (2.0, 0, 6),  # one burst into two old days
    *((4.0 + 0.5 * k, 2, 3) for k in range(11)),  # every 0.5 s for 5 s: max_delay_s
    (6.5, 0, 8),  # second cancellations (version 3) of the first burst's payments
)

Part = tuple[str, str]  # (datasource, partition)


# --- publishing ----------------------------------------------------------------------------


def _wire(row: Mapping[str, Any]) -> bytes:
    return orjson.dumps({k: rfc3339(v) if isinstance(v, datetime) else v for k, v in row.items()})


class Feed:
    """Publishes payment events as the domain team does (key = txn_id) and keeps, per
    topic partition, the offset of every acknowledged event."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._producer = producer(settings)
        self._lock = threading.Lock()
        self._delivered: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        self.failed: list[str] = []
        self.latest: dict[str, dict[str, Any]] = {}  # txn_id → newest state sent

    def send(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self._producer.produce(
                self.topic,
                key=row["txn_id"].encode(),
                value=_wire(row),
                on_delivery=partial(self._acked, row),
            )
            self.latest[row["txn_id"]] = row
        self._producer.poll(0)

    def _acked(self, row: dict[str, Any], err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(str(err))
            return
        with self._lock:
            bisect.insort(self._delivered.setdefault(msg.partition(), []), (msg.offset(), row))

    def flush(self) -> None:
        flush(self._producer, f"publishing to {self.topic}", timeout_s=60)
        assert not self.failed, self.failed[:3]

    def ends(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return {(self.topic, p): ev[-1][0] + 1 for p, ev in self._delivered.items() if ev}

    def upto(self, offsets: Mapping[tuple[str, int], int]) -> list[dict[str, Any]]:
        """Every acknowledged event below ``offsets``."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for p, events in self._delivered.items():
                end = offsets.get((self.topic, p), 0)
                out.extend(row for off, row in events if off < end)
        return out


def _cancel(old: Mapping[str, Any]) -> dict[str, Any]:
    """The payment's next cancellation: half of what is left, later the rest."""
    left = old["amount"] - old["canceled_amount"]
    canceled = old["amount"] if left <= 2_000 else old["canceled_amount"] + left // 2
    return payment(
        old["txn_id"],
        old["version"] + 1,
        merchant_id=old["merchant_id"],
        approved_at=old["approved_at"],
        amount=old["amount"],
        canceled_amount=canceled,
        method=old["method"],
    )


# --- threads and what they record ------------------------------------------------------------


class Worker(threading.Thread):
    """A daemon thread that keeps its target's result or exception."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc


class RecordingWatcher(Watcher):
    """The real watcher; it also remembers when each task ran (wall clock)."""

    def __init__(self, settings: Settings, registry: SpecRegistry, store: EmbeddedStore) -> None:
        super().__init__(settings, registry, store)
        self.spans: list[tuple[float, float, Task, bool]] = []

    def run_task(self, task: Task) -> Done | None:
        started = time.time()
        done = super().run_task(task)
        self.spans.append((started, time.time(), task, done is not None))
        return done


@dataclass
class Sample:
    at: float  # time.time() once the read finished
    parts: dict[Part, tuple[int, float | None]]  # segments, last write (epoch s)


@dataclass
class Observation:
    started: float
    finished: float
    generation: int  # read together with the offsets
    offsets: dict[tuple[str, int], int]
    cursor_generation: int = -1  # the generation the statement ran on
    fingerprint: tuple[Any, ...] | None = None
    error: str | None = None

    @property
    def pinned(self) -> bool:
        return self.error is None and self.generation == self.cursor_generation


@dataclass
class Recorded:
    samples: list[Sample] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    late_sent: list[tuple[float, str, int]] = field(default_factory=list)  # at, day, rows


# --- fingerprint: SQL and reference ------------------------------------------------------------


def _day_range(day: str) -> tuple[datetime, datetime]:
    start = datetime.fromisoformat(day).replace(tzinfo=SEOUL)
    return start.astimezone(UTC), (start + timedelta(days=1)).astimezone(UTC)


def _bucket(granularity: str) -> str:
    tz = "'Asia/Seoul'"
    return f"timezone({tz}, date_trunc('{granularity}', timezone({tz}, approved_at)))"


def _mismatches(spec: DatasourceSpec, name: str) -> str:
    """Groups where the rollup view disagrees with its recomputation from the merged view."""
    rollup = spec.rollup(name)
    dims = ", ".join(rollup.dimensions)
    differs = " OR ".join(
        f'b."{m.name}" IS DISTINCT FROM r."{m.name}"' for m in spec.parsed_metrics
    )
    return f"""(
        SELECT count(*) FROM (
            SELECT {_bucket(rollup.granularity)} AS bucket, {dims},
                   count(*) AS "count", sum(amount) AS gross_amount,
                   sum(canceled_amount) AS canceled_amount,
                   sum(amount - canceled_amount) AS net_amount
            FROM payments GROUP BY ALL
        ) b FULL OUTER JOIN {name} r USING (bucket, {dims})
        WHERE {differs}
    )"""


def fingerprint_sql(spec: DatasourceSpec, old_days: Sequence[str]) -> str:
    parts = [
        "(SELECT count(*) FROM payments)",
        "(SELECT count(DISTINCT txn_id) FROM payments)",
        "(SELECT coalesce(sum(amount), 0) FROM payments)",
        "(SELECT coalesce(sum(canceled_amount), 0) FROM payments)",
        "(SELECT coalesce(sum(version), 0) FROM payments)",
        "(SELECT count(*) FROM payments WHERE status = 'CANCELED')",
        "(SELECT count(*) FROM payments WHERE status = 'PARTIAL_CANCELED')",
    ]
    for day in old_days:
        lo, hi = _day_range(day)
        parts.append(
            "(SELECT [count(*), coalesce(sum(canceled_amount), 0), coalesce(sum(version), 0)]"
            f" FROM payments WHERE approved_at >= '{lo.isoformat()}'"
            f" AND approved_at < '{hi.isoformat()}')"
        )
    for name in ROLLUPS:
        parts.append(
            '(SELECT [count(*), coalesce(sum("count"), 0), coalesce(sum(gross_amount), 0),'
            f" coalesce(sum(canceled_amount), 0), coalesce(sum(net_amount), 0)] FROM {name})"
        )
    parts += [_mismatches(spec, name) for name in ROLLUPS]
    return "SELECT " + ",\n".join(parts)


class Reference:
    """The fingerprint a state "events below these offsets" must show, computed from
    scratch (bucket starts cached per event: the rest is recomputed every time)."""

    def __init__(self, spec: DatasourceSpec, old_days: Sequence[str]) -> None:
        self.spec = spec
        self.days = [_day_range(d) for d in old_days]
        self._buckets: dict[tuple[str, str], datetime] = {}

    def _bucket(self, row: Mapping[str, Any], granularity: Any) -> datetime:
        key = (row["event_id"], granularity)
        value = self._buckets.get(key)
        if value is None:
            value = self._buckets[key] = floor(row["approved_at"], granularity, self.spec.tz)
        return value

    def fingerprint(self, events: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
        latest = latest_by_key(self.spec, events)
        rows = list(latest.values())
        out: list[Any] = [
            len(rows),
            len(rows),
            sum(r["amount"] for r in rows),
            sum(r["canceled_amount"] for r in rows),
            sum(r["version"] for r in rows),
            sum(r["status"] == "CANCELED" for r in rows),
            sum(r["status"] == "PARTIAL_CANCELED" for r in rows),
        ]
        for lo, hi in self.days:
            on_day = [r for r in rows if lo <= r["approved_at"] < hi]
            out.append(
                [
                    len(on_day),
                    sum(r["canceled_amount"] for r in on_day),
                    sum(r["version"] for r in on_day),
                ]
            )
        metrics = self.spec.parsed_metrics
        for name in ROLLUPS:
            rollup = self.spec.rollup(name)
            groups: dict[tuple[Any, ...], list[int]] = {}
            for r in rows:
                key = (self._bucket(r, rollup.granularity), *(r[d] for d in rollup.dimensions))
                sums = groups.setdefault(key, [0] * len(metrics))
                for i, metric in enumerate(metrics):
                    sums[i] += metric.evaluate(r)
            live = [v for v in groups.values() if any(v)]
            out.append([len(live), *(sum(v[i] for v in live) for i in range(len(metrics)))])
        return (*out, 0, 0)


# --- the test --------------------------------------------------------------------------------


def _stored(catalog: Catalog) -> dict[tuple[str, int], int]:
    with catalog.read():
        return catalog.offsets("payments")


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s: {what}"
        time.sleep(0.02)


def _history(old_days: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d, day in enumerate(old_days):
        noon = _day_range(day)[0] + timedelta(hours=12)
        out[day] = [
            payment(
                f"h{d}-{i:04d}",
                merchant_id=MERCHANTS[i % len(MERCHANTS)],
                method=METHODS[i % len(METHODS)],
                approved_at=noon + timedelta(seconds=97 * i),
                amount=1_000 * (5 + i % 40),
            )
            for i in range(HISTORY_PER_DAY)
        ]
    return out


def _late_latencies(
    samples: Sequence[Sample], watched: Mapping[Part, Sequence[Part]], since: float
) -> dict[Part, list[tuple[float, float | None]]]:
    """Per watched partition: (late write time, seconds until a poll showed it done)."""
    writes: dict[Part, set[float]] = {}
    for s in samples:
        for part, (_, last_write) in s.parts.items():
            if last_write is not None and last_write > since:
                writes.setdefault(part, set()).add(last_write)
    out: dict[Part, list[tuple[float, float | None]]] = {}
    for part, feeders in watched.items():
        times = sorted(set().union(*(writes.get(f, set()) for f in feeders)))
        out[part] = []
        for write in times:
            done = None
            for s in samples:
                last = max((s.parts.get(f, (0, None))[1] or 0.0 for f in feeders), default=0.0)
                if last >= write and s.parts.get(part, (0, None))[0] == 1:
                    done = s.at - write
                    break
            out[part].append((write, done))
    return out


def test_late_cancellations_are_compacted_during_ingestion(
    broker: Broker, registry: SpecRegistry, tmp_path: Path
) -> None:
    spec = registry.get("payments")
    settings = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap=broker.bootstrap,
        topic_namespace=f"t{uuid.uuid4().hex[:10]}.",
        # Replaced files outlive their replacement by far longer than a query runs.
        store=StoreSettings(gc_grace_s=3.0),
        ingest=IngestSettings(batch_max_wait_s=0.1, partitions=6),
        compaction=CompactionSettings(interval_s=0.2),
    )
    ensure_topics(settings, [spec])
    feed = Feed(settings, settings.topic(spec.datasource.topic))
    store = EmbeddedStore(settings, registry)  # the watcher's; creates the catalog
    catalog = Catalog(settings.catalog_path, readonly=True)
    rec = Recorded()
    today = datetime.now(SEOUL).date()
    old_days = [(today - timedelta(days=d)).isoformat() for d in OLD_DAYS]
    history = _history(old_days)
    feed.send([row for rows in history.values() for row in rows])
    feed.flush()

    stop_ingest, stop_publish, stop = threading.Event(), threading.Event(), threading.Event()
    ingest = Worker("ingest", lambda: run_ingest(settings, [spec], ["olap"], stop_ingest))
    ingest.start()
    threads: list[Worker] = []
    try:
        _wait(lambda: _stored(catalog) == feed.ends(), 60, "the history is ingested")
        # The history itself was written late: start from one segment per old partition.
        for s in store.partition_stats():
            if s.segments > 1:
                store.compactor.compact(s.datasource, s.partition)
        ended_before_window = window_test(registry, store)
        now = datetime.now(UTC)
        base_parts: list[Part] = [("payments", day) for day in old_days]
        watched: dict[Part, list[Part]] = {p: [p] for p in base_parts}
        for s in store.partition_stats():
            if s.datasource in ROLLUPS and ended_before_window(s.datasource, s.partition, now):
                lo, hi = store.partition_range(s.datasource, s.partition)
                watched[(s.datasource, s.partition)] = [
                    b for b in base_parts if lo <= _day_range(b[1])[0] < hi
                ]
        assert len(watched) > len(base_parts), "no old rollup partition to watch"
        counts = {(s.datasource, s.partition): s.segments for s in store.partition_stats()}
        assert all(counts[p] == 1 for p in watched), counts

        watcher = RecordingWatcher(settings, registry, store)
        sql = fingerprint_sql(spec, old_days)

        def publish() -> None:
            schedule = sorted(LATE_SCHEDULE)
            started = time.monotonic()
            seq = 0
            while not stop_publish.is_set():
                now = datetime.now(UTC)
                now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as on the wire
                batch = [
                    payment(
                        f"n{seq + j:06d}",
                        merchant_id=MERCHANTS[(seq + j) % len(MERCHANTS)],
                        method=METHODS[(seq + j) % len(METHODS)],
                        approved_at=now - timedelta(milliseconds=37 * j),
                        amount=1_000 * (3 + (seq + j) % 50),
                    )
                    for j in range(NEW_PER_TICK)
                ]
                if seq:  # a cancellation of a recent payment: the hot partition
                    batch.append(_cancel(feed.latest[f"n{seq - 7:06d}"]))
                seq += NEW_PER_TICK
                while schedule and schedule[0][0] <= time.monotonic() - started:
                    _, d, n = schedule.pop(0)
                    day = old_days[d]
                    open_ = [
                        r["txn_id"]
                        for r in history[day]
                        if feed.latest[r["txn_id"]]["canceled_amount"] < r["amount"]
                    ]
                    # Canceled ones first: their next event is a second cancellation.
                    open_.sort(key=lambda t: -feed.latest[t]["version"])
                    late = [_cancel(feed.latest[t]) for t in open_[:n]]
                    batch += late
                    rec.late_sent.append((time.time(), day, len(late)))
                feed.send(batch)
                stop_publish.wait(TICK_S)
            feed.flush()

        def monitor() -> None:
            mon = Catalog(settings.catalog_path, readonly=True)
            try:
                while not stop.is_set():
                    with mon.read():
                        stats = mon.stats_rows(None)
                    parts: dict[Part, tuple[int, float | None]] = {}
                    for ds, part, segments, *_, last_write, _compacted in stats:
                        key = (str(ds), str(part))
                        if key in watched:
                            lw = None if last_write is None else float(last_write)  # type: ignore[arg-type]
                            parts[key] = (int(segments), lw)  # type: ignore[call-overload]
                    rec.samples.append(Sample(time.time(), parts))
                    time.sleep(0.02)
            finally:
                mon.close()

        def read() -> None:
            reader = EmbeddedReader(settings, registry)
            cat = Catalog(settings.catalog_path, readonly=True)
            try:
                while not stop.is_set():
                    started = time.time()
                    with cat.read():
                        obs = Observation(started, 0.0, cat.generation(), cat.offsets("payments"))
                    try:
                        cur = reader.cursor(sql)  # pins one generation for the statement
                        obs.cursor_generation = reader.snapshot.generation
                        try:
                            row = cur.execute(sql).fetchone()
                        finally:
                            cur.close()
                        assert row is not None
                        obs.fingerprint = tuple(row)
                    except Exception as exc:
                        obs.error = f"{type(exc).__name__}: {exc}"
                    obs.finished = time.time()
                    rec.observations.append(obs)
            finally:
                cat.close()
                reader.close()

        steady_since = time.time()
        threads = [
            Worker("watcher", lambda: watcher.run(stop)),
            Worker("monitor", monitor),
            Worker("reader", read),
            Worker("publisher", publish),
        ]
        for t in threads:
            t.start()

        def settled() -> bool:
            """Every late burst committed, every watched partition in one segment."""
            if len(rec.late_sent) < len(LATE_SCHEDULE) or not rec.samples:
                return False
            last = rec.samples[-1].parts
            sent = {day: at for at, day, _ in rec.late_sent}
            return all((last[b][1] or 0.0) >= sent[b[1]] for b in base_parts) and all(
                last[p][0] == 1 for p in watched
            )

        last_burst = max(at for at, _, _ in LATE_SCHEDULE)
        _wait(settled, last_burst + SETTLE_S, "late partitions back in one segment")
        stop_publish.set()
        threads[-1].join(60)
        _wait(lambda: _stored(catalog) == feed.ends(), 60, "everything published is ingested")
    finally:
        stop_publish.set()
        stop.set()
        for t in threads:
            t.join(60)
        stop_ingest.set()
        ingest.join(60)
        catalog.close()
    for t in [*threads, ingest]:
        assert not t.is_alive(), f"{t.name} did not stop"
        assert t.error is None, f"{t.name} failed: {t.error!r}"
    reports: list[RunReport] = ingest.result
    assert all(r.error is None for r in reports), [r.error for r in reports]

    try:
        # 1. Each late write was compacted away (how soon: bench/compaction.py).
        latencies = _late_latencies(rec.samples, watched, steady_since)
        slow = {
            p: [(round(w - steady_since, 2), d) for w, d in ls if d is None]
            for p, ls in latencies.items()
        }
        tasks = [
            (round(a - steady_since, 2), round(b - a, 3), t.datasource, t.partition, t.kind)
            for a, b, t, _ in watcher.spans
        ]
        assert not any(slow.values()), (
            f"never back in one segment (write at s): {slow}; tasks (start s, took s, ...): {tasks}"
        )
        writes = {p[1]: len(latencies[p]) for p in base_parts}
        assert all(n >= 1 for n in writes.values()), writes
        assert writes[old_days[2]] >= 5, writes  # the day written every 0.5 s for 5 s
        late_tasks = [
            (a, b, task)
            for a, b, task, ok in watcher.spans
            if ok and task.kind == "late" and (task.datasource, task.partition) in watched
        ]
        compacted = {(task.datasource, task.partition) for _, _, task in late_tasks}
        assert compacted == set(watched), compacted

        # 2. Every query succeeded and saw an exact state.
        errors = [o.error for o in rec.observations if o.error]
        assert not errors, f"{len(errors)} failed queries, first: {errors[0]}"
        reference = Reference(spec, old_days)
        expected: dict[tuple[tuple[tuple[str, int], int], ...], tuple[Any, ...]] = {}
        checked = 0
        previous: dict[tuple[str, int], int] = {}
        for o in rec.observations:
            fp = o.fingerprint
            assert fp is not None
            rows, keys, *_, hourly_off, daily_off = fp
            assert rows == keys, f"a key appears twice in the merged view: {fp}"
            assert (hourly_off, daily_off) == (0, 0), f"rollups differ from the base: {fp}"
            assert all(o.offsets.get(tp, 0) >= n for tp, n in previous.items()), "went back"
            previous = o.offsets
            if not o.pinned:
                continue
            key = tuple(sorted(o.offsets.items()))
            if key not in expected:
                expected[key] = reference.fingerprint(feed.upto(o.offsets))
            assert fp == expected[key], f"generation {o.generation}: {fp} != {expected[key]}"
            checked += 1
        assert checked >= 20, f"only {checked} of {len(rec.observations)} observations pinned"
        during = sum(
            1
            for o in rec.observations
            if o.pinned and any(a < o.finished and o.started < b for a, b, _ in late_tasks)
        )
        assert during >= 1, "no checked query ran while a late partition was being compacted"

        # 3. In the end: nothing lost, nothing doubled, rollups exact, files present.
        final = EmbeddedReader(settings, registry)
        try:
            everything = feed.upto(feed.ends())
            latest = latest_by_key(spec, everything)
            cols = ["txn_id", "version", "event_id", "status", "canceled_amount", "approved_at"]
            got_rows = final.query(f"SELECT {', '.join(cols)} FROM payments").rows
            got = {r[0]: tuple(normalise(v) for v in r[1:]) for r in got_rows}
            assert len(got) == len(got_rows) == len(latest)
            want = {k: tuple(normalise(r[c]) for c in cols[1:]) for k, r in latest.items()}
            assert got == want
            for name in ROLLUPS:
                rollup = spec.rollup(name)
                names = ["bucket", *rollup.dimensions]
                width = len(names)
                metrics = [m.name for m in spec.parsed_metrics]
                quoted = ", ".join(f'"{c}"' for c in names + metrics)
                stored = {
                    tuple(normalise(v) for v in r[:width]): tuple(r[width:])
                    for r in final.query(f"SELECT {quoted} FROM {name}").rows
                }
                want_groups = {
                    tuple(normalise(v) for v in k): v
                    for k, v in reference_rollup(spec, name, latest).items()
                }
                assert stored == want_groups, f"{name} differs from its recomputation"
        finally:
            final.close()
        assert all(Path(s.path).exists() for s in store.live_segments())
        counts = {(s.datasource, s.partition): s.segments for s in store.partition_stats()}
        assert all(counts[p] == 1 for p in watched), counts
        worst = max(d or 0.0 for ls in latencies.values() for _, d in ls)
        print(
            f"late writes per day {writes}; worst write→one segment {worst:.2f}s; "
            f"{len(rec.observations)} queries, {checked} checked against the reference "
            f"({len(expected)} states), {during} during a late compaction; "
            f"{len(watcher.spans)} compaction tasks"
        )
    finally:
        store.close()

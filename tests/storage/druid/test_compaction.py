"""The compaction watcher on a real Druid fed by a real Kafka: late cancellations into
days 30 and 62 days old land while new payments stream in, and the watcher compacts
each late chunk (the base's and the rollups') back to one segment set after it saw
the write; every answer stays exact meanwhile and after. How soon is measured by
``bench/druid.py`` (late write → compacted, beside the embedded store).

The pipeline is the production one: a publisher thread (new payments approved "now"
every 0.3 s), ``tally ingest --sink olap`` (the relay, in its own process), Druid's
supervisors (``tally druid apply``: APPEND locks), and the real
:class:`~compaction.watcher.Watcher` on the Druid store in a thread (real clock, two
compactions in flight at most). The history of the old days is published first and
handed off, so each old chunk starts as one published segment.

A reader thread queries during the whole run, compactions included: the old days'
raw row count (every version Druid holds) never goes down and never exceeds history
plus late versions (a segment swap that showed both sets, or neither, would), and
their merged gross amount (unchanged by cancellations) is constant.

A failed compaction task (here one naming a segment that is gone, as when the chunk's
segment set changed after it was listed) is a conflict, refused while the chunk backs
off, then retried: the last test.

What it does not prove: how soon on a busier machine or with large chunks (a
chunk here compacts in seconds); a task losing its lock to ingestion (concurrent
locks make that not happen: it would fail like the stale task); several watchers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY
from sqlglot import exp

from compaction.policy import Done
from compaction.watcher import Watcher
from ingest.kafka import ensure_topics
from storage.druid import segments as seg
from storage.druid.reader import DruidReader
from storage.druid.store import DruidStore
from storage.druid.supervisor import datasource_name, supervisors
from storage.sql import col, subquery
from tally.errors import CompactionConflict
from tally.settings import CompactionSettings, Settings
from tally.specs import SpecRegistry
from tally.timeutil import Granularity, floor
from tests.brokers import KafkaBroker
from tests.cli import tally
from tests.compaction.test_late_under_ingestion import Feed, Worker, _cancel
from tests.conftest import broker_settings
from tests.druid import Druid, poll
from tests.factories import latest_by_key, payment, reference_rollup
from tests.ingest.conftest import env_for, start_ingest
from tests.storage.druid.conftest import druid_settings
from tests.storage.druid.test_e2e import rollup_groups

pytestmark = pytest.mark.slow

SEOUL = ZoneInfo("Asia/Seoul")
OLD_DAYS = (30, 62)  # the 62-day-old day's month chunks of the rollups are old too
HISTORY_PER_DAY = 120
LATE_PER_DAY = 15


def _settings(kafka: KafkaBroker, druid: Druid, data_dir: Path) -> Settings:
    base = druid_settings(druid, data_dir, broker_settings(kafka, data_dir, partitions=2))
    return base.model_copy(
        update={
            "compaction": CompactionSettings(interval_s=0.5, max_in_flight=4),
            "druid": base.druid.model_copy(update={"handoff_interval_s": 3.0}),
        }
    )


def _old_day_rows(
    druid: Druid, reader: DruidReader, base: str, days: Sequence[datetime]
) -> tuple[int, int]:
    """(rows Druid holds, merged gross amount) of the old days' Seoul dates."""
    lo = min(days).replace(hour=0)
    hi = max(days).replace(hour=0) + timedelta(days=1)
    iso = [t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") for t in (lo, hi)]
    raw = druid.sql(
        f'SELECT COUNT(*) FROM "{base}"'
        f" WHERE __time >= TIMESTAMP '{iso[0]}' AND __time < TIMESTAMP '{iso[1]}'"
    )[0][0]
    merged = exp.select(exp.Sum(this=col("amount"))).from_(
        subquery(reader.relation("payments", lo, hi), "m")
    )
    gross = reader.query(merged.sql(dialect=reader.capabilities.sql_dialect)).rows[0][0]
    return int(raw), int(gross or 0)


def test_late_cancellations_into_old_days_are_compacted_by_the_watcher_on_druid(
    kafka_broker: KafkaBroker,
    druid: Druid,
    data_dir: Path,
    registry: SpecRegistry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    spec = registry.get("payments")
    settings = _settings(kafka_broker, druid, data_dir)
    ensure_topics(settings, registry)
    feed = Feed(settings, settings.topic(spec.datasource.topic))
    now = datetime.now(SEOUL).replace(minute=0, second=0, microsecond=0)
    days = [(now - timedelta(days=d)).replace(hour=12) for d in OLD_DAYS]
    history = [
        payment(f"h{d}-{i}", merchant_id=f"m{i % 3}", approved_at=day + timedelta(seconds=i))
        for d, day in zip(OLD_DAYS, days, strict=True)
        for i in range(HISTORY_PER_DAY)
    ]
    feed.send(history)
    feed.flush()

    ingest = start_ingest(settings, "--sink", "olap", log=tmp_path / "ingest.log")
    names = list(supervisors(settings, spec))
    request.addfinalizer(lambda: druid.drop(*names))
    applied = tally("druid", "apply", "--format", "json", env=env_for(settings))
    assert applied.code == 0, applied.err
    base = datasource_name(settings, spec)
    reader = DruidReader(settings, registry)
    store = DruidStore(settings, registry)
    stop = threading.Event()
    try:
        # The history, published: each old chunk is one segment (not due).
        poll(lambda: druid.count(base) == len(history) or None, 180, "history not served")
        for name in names:
            druid.handoff(name)
        poll(lambda: _sealed(store) or None, 180, "the history is not handed off")
        env = env_for(settings)
        # An operator compacts one old day by hand (tally compaction run --partition).
        first = days[0].astimezone(UTC).strftime("%Y-%m-%d")
        ran = tally(
            "compaction", "run", "--datasource", "payments", "--partition", first,
            "--format", "json", env=env,
        )  # fmt: skip
        assert ran.code == 0, ran.err
        (result,) = ran.json()["compacted"]
        assert (result["partition"], result["replaced_segments"]) == (first, 1)
        assert result["rows_in"] == result["rows_out"] == HISTORY_PER_DAY
        assert seg.one_set(store.compactor.chunks("payments")[("payments", first)])
        watcher = Watcher(settings, registry, store)
        assert watcher.due() == []
        before = _metric("tally_compaction_detect_to_start_seconds_count")

        done: list[Done] = []
        lock = threading.Lock()

        def keep(finished: Sequence[Done]) -> None:
            with lock:
                done.extend(finished)

        watching = Worker("watcher", lambda: watcher.run(stop, keep))
        steady = Worker("steady", lambda: _steady(feed, stop))
        observed: list[tuple[int, int]] = []
        reading = Worker("reader", lambda: _observe(druid, reader, base, days, stop, observed))
        for worker in (watching, steady, reading):
            worker.start()

        time.sleep(2.0)  # steady ingestion under way before the late writes
        late = [_cancel(r) for r in history if int(r["txn_id"].split("-")[1]) < LATE_PER_DAY]
        feed.send(late)
        feed.flush()
        late_chunks = _late_chunks(store, watcher, days)

        def compacted() -> bool | None:
            chunks = store.compactor.chunks()
            return all(seg.one_set(chunks.get(c, [])) for c in late_chunks) or None

        poll(compacted, 240, f"late chunks {late_chunks} not each one segment set")
        stop.set()
        for worker in (watching, steady, reading):
            worker.join(timeout=120)
            assert worker.error is None, worker.error

        # Each late chunk: compacted by a late task that started after the watcher first
        # saw the late segment. How soon is a figure of bench/druid.py (a wall-clock
        # limit here would fail a correct watcher on a loaded machine).
        late_done = {
            (d.task.datasource, d.task.partition): d for d in done if d.task.kind == "late"
        }
        assert set(late_chunks) <= set(late_done), (late_chunks, list(late_done))
        starts = {c: late_done[c].detect_to_start_s for c in late_chunks}
        assert all(s is not None and s >= 0 for s in starts.values()), starts

        # The watcher's metrics counted them; the CLI shows each late chunk healed.
        assert _metric("tally_compaction_detect_to_start_seconds_count") - before >= len(
            {c for c in late_chunks if c[0] == "payments"}
        )
        status = tally("compaction", "status", "--format", "json", env=env)
        assert status.code == 0, status.err
        shown = {(p["datasource"], p["partition"]): p for p in status.json()["partitions"]}
        for chunk in late_chunks:
            assert shown[chunk]["segments"] == 1 and not shown[chunk]["due"], shown[chunk]
        assert shown[("payments", first)]["last_compacted_at"] is not None

        # Queries during compaction: no row lost or doubled, gross constant.
        history_gross = sum(r["amount"] for r in history)
        assert len(observed) > 10
        counts = [n for n, _ in observed]
        assert counts == sorted(counts), "a query saw fewer rows than an earlier one"
        assert len(history) <= counts[0] and counts[-1] <= len(history) + len(late)
        assert {g for _, g in observed} == {history_gross}

        # After: everything exact, base merged and every rollup.
        feed.flush()
        latest = latest_by_key(spec, list(feed.latest.values()))
        poll(
            lambda: druid.count(base) == len(history) + len(late) + _new(feed) or None,
            120,
            "not every version served",
        )
        assert _old_day_rows(druid, reader, base, days) == (
            len(history) + len(late),
            history_gross,
        )
        for rollup in spec.rollups:
            want = reference_rollup(spec, rollup.name, latest)
            poll(
                lambda r=rollup, w=want: rollup_groups(reader, spec, r) == w or None,  # type: ignore[misc]
                120,
                f"{rollup.name} differs from the reference",
            )
    finally:
        stop.set()
        ingest.terminate()
        ingest.wait(timeout=60)
        store.close()
        reader.close()


def _metric(name: str) -> float:
    """The sum over datasources of one of the watcher's Prometheus samples."""
    return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == name)


def _sealed(store: DruidStore) -> bool:
    """Every chunk of every datasource published (no realtime segment left)."""
    return all(s.sealed for s in store.live_segments())


def _late_chunks(
    store: DruidStore, watcher: Watcher, days: Sequence[datetime]
) -> list[tuple[str, str]]:
    """The chunks the late cancellations write into that have ended before the
    active window: the old days' base chunks, and the rollups' month chunks that are old."""
    spec = store.registry.get("payments")
    # A rollup row's Druid time is its bucket's start (a Seoul hour or day).
    grains: dict[str, Granularity | None] = {spec.name: None}
    grains |= {r.name: r.granularity for r in spec.rollups}
    out = []
    old = watcher._old  # the watcher's own window test
    now = datetime.now(UTC)
    for name, target in store.compactor.targets.items():
        for day in days:
            grain = grains[name]
            partition = target.key(day if grain is None else floor(day, grain, spec.tz))
            if old(name, partition, now) and (name, partition) not in out:
                out.append((name, partition))
    return out


def _steady(feed: Feed, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        at = datetime.now(SEOUL) - timedelta(minutes=1)
        feed.send(
            [payment(f"n{n + i}", merchant_id=f"m{i % 3}", approved_at=at) for i in range(10)]
        )
        n += 10
        stop.wait(0.3)


def _new(feed: Feed) -> int:
    return sum(1 for k in feed.latest if k.startswith("n"))


def _observe(
    druid: Druid,
    reader: DruidReader,
    base: str,
    days: Sequence[datetime],
    stop: threading.Event,
    out: list[tuple[int, int]],
) -> None:
    while not stop.is_set():
        out.append(_old_day_rows(druid, reader, base, days))
        stop.wait(0.2)


def test_a_failed_compaction_task_is_retried_after_a_backoff(
    druid: Druid, data_dir: Path, registry: SpecRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk in two segments (two batch loads, no Kafka); the first compaction task
    Druid runs FAILS (it names a segment that does not exist, as a task whose segment
    set changed meanwhile would), which is a conflict: planned afresh, refused while
    the chunk backs off, then compacted for real."""
    from storage.druid import compactor as module
    from tests.storage.druid.loading import load

    spec = registry.get("payments")
    settings = druid_settings(druid, data_dir)
    day = datetime.now(SEOUL).replace(hour=12, minute=0, second=0, microsecond=0)
    day -= timedelta(days=40)
    load(druid, settings, spec, [payment("a", approved_at=day)])
    load(druid, settings, spec, [payment("b", approved_at=day)])
    store = DruidStore(settings, registry)
    compactor = store.compactor
    now = [1000.0]
    compactor.monotonic = lambda: now[0]
    partition = compactor.target("payments").key(day)
    real = module.compaction_spec

    def stale(target: Any, task_id: str, ids: Sequence[str]) -> dict[str, Any]:
        return real(target, task_id, [*ids, f"{ids[0]}_gone"])

    monkeypatch.setattr(module, "compaction_spec", stale)
    with pytest.raises(CompactionConflict, match="FAILED"):
        compactor.compact("payments", partition)
    monkeypatch.setattr(module, "compaction_spec", real)
    with pytest.raises(CompactionConflict, match="next try in"):
        compactor.compact("payments", partition)  # backing off: no task submitted
    now[0] += 2.0
    result = compactor.compact("payments", partition)
    assert result is not None and result.replaced_segments == 2 and result.rows_out == 2
    assert seg.one_set(compactor.chunks("payments")[("payments", partition)])
    store.close()

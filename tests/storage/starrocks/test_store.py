"""The StarRocks writer's exactly-once: batches of labelled loads, interrupted at
every point between two loads and committed again, equal the reference.

On the stand-in these tests do not prove StarRocks' own SQL semantics or planner
(DuckDB runs the transpiled statements), its label retention, its tablet versions,
replication or publish protocol; they prove Tally's sequence of loads and labels
against the documented behaviour the stand-in follows.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlglot import exp

from producers.generate import GeneratorConfig, generate_events
from storage.protocol import DeadLetterRecord, OffsetRange
from storage.sql import subquery
from storage.starrocks import ddl
from storage.starrocks.reader import StarRocksReader
from storage.starrocks.store import StarRocksStore
from storage.starrocks.streamload import LoadResult
from tally.errors import OffsetMismatch, StoreUnavailable
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.factories import latest_by_key, reference_rollup
from tests.storage.starrocks.standin import StandIn

TOPIC = "payments.v1"
LOADS_PER_BATCH = ["intent", "letters", "rollup 0", "rollup 1", "base", "writes", "offsets"]


class Crash(BaseException):
    """The process dies here (BaseException: no handler of Tally's catches it)."""


def _events(n: int = 1_500, seed: int = 4) -> list[dict[str, Any]]:
    config = GeneratorConfig(transactions=n, merchants=8, days=20, seed=seed, duplicate_rate=0.05)
    out = []
    for e in generate_events(config):
        for f in ("occurred_at", "approved_at"):
            e[f] = datetime.fromisoformat(e[f])
        out.append(e)
    return out


def _letter(offset: int) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=f"payments:{TOPIC}:0:{offset}",
        datasource="payments",
        sink="olap",
        topic=TOPIC,
        partition=0,
        offset=offset,
        key=None,
        value=b"{not json",
        reason="malformed",
        failed_at=0.0,
    )


def _batches(
    events: list[dict[str, Any]], size: int = 300
) -> list[tuple[list[dict[str, Any]], dict[Any, OffsetRange], list[DeadLetterRecord]]]:
    """Batches on one partition; each batch's last offset is a malformed message."""
    out = []
    offset = 0
    for i in range(0, len(events), size):
        rows = events[i : i + size]
        end = offset + len(rows) + 1
        out.append((rows, {(TOPIC, 0): OffsetRange(offset, end)}, [_letter(end - 1)]))
        offset = end
    return out


def _crash_at(store: StarRocksStore, nth: int) -> None:
    """The ``nth`` load (0-based) from now on never happens: the process died."""
    real = store.loader.load
    calls = [0]

    def load(*args: Any, **kwargs: Any) -> LoadResult:
        calls[0] += 1
        if calls[0] == nth + 1:
            raise Crash(f"killed before load {nth}")
        return real(*args, **kwargs)

    store.loader.load = load  # type: ignore[method-assign]


def assert_exact(
    settings: Settings, registry: SpecRegistry, events: list[dict[str, Any]], letters: int
) -> None:
    spec = registry.get("payments")
    latest = latest_by_key(spec, events)
    reader = StarRocksReader(settings, registry)
    try:
        stored = reader.lookup("payments", list(latest)).to_pylist()
        assert {r["txn_id"]: (r["version"], r["event_id"]) for r in stored} == {
            k: (r["version"], r["event_id"]) for k, r in latest.items()
        }
        metrics = [m.name for m in spec.parsed_metrics]
        for rollup in spec.rollups:
            keys = [exp.column(c, quoted=True) for c in ("bucket", *rollup.dimensions)]
            sums = [exp.alias_(exp.Sum(this=exp.column(m, quoted=True)), m) for m in metrics]
            tree = (
                exp.select(*keys, *sums)
                .from_(subquery(reader.relation(rollup.name), "r"))
                .group_by(*keys)
            )
            got = {
                (row[0].timestamp(), *row[1 : len(keys)]): tuple(int(v) for v in row[len(keys) :])
                for row in reader.query(tree.sql("starrocks")).rows
                if any(int(v) for v in row[len(keys) :])
            }
            want = {
                (k[0].timestamp(), *k[1:]): v
                for k, v in reference_rollup(spec, rollup.name, latest).items()
            }
            assert got == want, f"{rollup.name}: {len(got.keys() ^ want.keys())} groups differ"
    finally:
        reader.close()
    store = StarRocksStore(settings, registry)
    try:
        pending = store.pending("payments")
        assert len(pending) == letters and len({d.id for d in pending}) == letters
        assert store.pending_batches("payments") == []
    finally:
        store.close()


def test_batches_with_duplicates_out_of_order_versions_and_late_cancellations_are_exact(
    sr_settings: Settings, registry: SpecRegistry
) -> None:
    """Every key holds its latest (version, event_id), each rollup the aggregate of
    those, each dead letter once; the offsets are the last batch's end. Not proven on
    the stand-in: StarRocks' own merge_condition and SUM (the stand-in follows their
    documentation)."""
    events = _events()
    batches = _batches(events)
    store = StarRocksStore(sr_settings, registry)
    for rows, ranges, letters in batches:
        store.commit("payments", rows, ranges, dead_letters=letters)
    assert store.stored_offsets("payments") == {(TOPIC, 0): batches[-1][1][(TOPIC, 0)].end}
    with pytest.raises(OffsetMismatch):  # the first batch again: another writer's replay
        store.commit("payments", *batches[0][:2])
    store.close()
    assert_exact(sr_settings, registry, events, letters=len(batches))


@pytest.mark.parametrize("point", range(len(LOADS_PER_BATCH)), ids=LOADS_PER_BATCH)
def test_a_crash_before_any_load_of_a_batch_is_finished_by_committing_it_again(
    sr_settings: Settings, registry: SpecRegistry, point: int
) -> None:
    """The third batch dies before its load ``point``; a new writer finds it pending,
    refuses a batch that cuts across it, commits it again with its ranges, and goes
    on: nothing doubled (the rollups are the reference), nothing lost. Not proven on
    the stand-in: a load StarRocks applied whose answer was lost (it is the same case
    for the labels, but the stand-in never loses an answer)."""
    events = _events(900, seed=7)
    batches = _batches(events)
    store = StarRocksStore(sr_settings, registry)
    for rows, ranges, letters in batches[:2]:
        store.commit("payments", rows, ranges, dead_letters=letters)
    rows, ranges, letters = batches[2]
    _crash_at(store, point)
    with pytest.raises(Crash):
        store.commit("payments", rows, ranges, dead_letters=letters)
    store.close()

    again = StarRocksStore(sr_settings, registry)
    if point == 0:  # nothing was loaded: not even the intent
        assert again.pending_batches("payments") == []
    else:
        assert again.pending_batches("payments") == [ranges]
        shorter = {(TOPIC, 0): OffsetRange(ranges[(TOPIC, 0)].start, ranges[(TOPIC, 0)].end - 5)}
        with pytest.raises(OffsetMismatch, match="still being loaded"):
            again.commit("payments", rows[:-5], shorter)
    again.commit("payments", rows, ranges, dead_letters=letters)
    for rows, ranges, letters in batches[3:]:
        again.commit("payments", rows, ranges, dead_letters=letters)
    again.close()
    assert_exact(sr_settings, registry, events, letters=len(batches))


def test_a_batch_left_pending_beyond_the_label_window_is_recovered_by_rebuilding(
    sr_settings: Settings, registry: SpecRegistry
) -> None:
    """A batch died after its first rollup's deltas, and stayed pending longer than
    StarRocks keeps labels: its labels cannot be trusted, so it is committed without
    deltas and its partitions' rollups are rebuilt from the base table — exact. Not
    proven on the stand-in: StarRocks' expiry of labels (the window is crossed by
    the commit's clock, and the stand-in still knows the labels)."""
    events = _events(600, seed=9)
    batches = _batches(events)
    store = StarRocksStore(sr_settings, registry)
    store.commit("payments", *batches[0][:2], dead_letters=batches[0][2])
    rows, ranges, letters = batches[1]
    _crash_at(store, LOADS_PER_BATCH.index("rollup 1"))
    with pytest.raises(Crash):
        store.commit("payments", rows, ranges, dead_letters=letters)
    store.close()
    keep = sr_settings.starrocks.label_keep_s
    later = datetime.now(UTC) + timedelta(seconds=keep + 60)
    again = StarRocksStore(sr_settings, registry)
    again.commit("payments", rows, ranges, now=later, dead_letters=letters)
    for rows, ranges, letters in batches[2:]:
        again.commit("payments", rows, ranges, dead_letters=letters)
    again.close()
    assert_exact(sr_settings, registry, events, letters=len(batches))


def test_a_filtered_row_of_a_batch_pending_beyond_the_label_window_counts_nowhere(
    sr_settings: Settings, registry: SpecRegistry
) -> None:
    """A batch died before its deltas and stayed pending past the label window; on
    its replay StarRocks filters one row, alone in its partition. No delta of it was
    ever loaded, so none may be taken back: the rebuild of every partition the batch
    touched is what makes the rollups exact. Not proven on the stand-in: StarRocks'
    expiry of labels (crossed by the commit's clock here)."""
    events = _events(300, seed=13)
    far = datetime(2024, 6, 1, 12, tzinfo=UTC)  # a partition no other row is in
    bad = dict(
        events[0],
        txn_id="txn_huge_alone",
        order_name="x" * 70_000,
        event_id="evt_alone",
        approved_at=far,
        occurred_at=far,
    )
    rows = [*events, bad]
    ranges = {(TOPIC, 0): OffsetRange(0, len(rows))}
    store = StarRocksStore(sr_settings, registry)
    _crash_at(store, LOADS_PER_BATCH.index("rollup 0"))
    with pytest.raises(Crash):
        store.commit("payments", rows, ranges)
    store.close()
    later = datetime.now(UTC) + timedelta(seconds=sr_settings.starrocks.label_keep_s + 60)
    again = StarRocksStore(sr_settings, registry)
    again.commit("payments", rows, ranges, now=later)
    again.close()
    assert_exact(sr_settings, registry, events, letters=1)


def test_a_row_starrocks_filters_is_dead_lettered_with_its_reason_and_counts_nowhere(
    sr_settings: Settings, registry: SpecRegistry
) -> None:
    """An order name longer than its VARCHAR(65533) passes Tally's spec but not
    StarRocks: the base load fails, the row becomes a dead letter with the ErrorURL's
    reason, its deltas are taken back, the rest is stored. Not proven here: which
    other values StarRocks would filter, and its exact reason text."""
    events = _events(200, seed=3)
    bad = dict(events[0], txn_id="txn_huge", order_name="x" * 70_000, event_id="evt_bad")
    store = StarRocksStore(sr_settings, registry)
    store.commit("payments", [*events, bad], {(TOPIC, 0): OffsetRange(0, len(events) + 1)})
    letters = store.pending("payments")
    store.close()
    assert [d.key for d in letters] == [b"txn_huge"]
    assert "length" in letters[0].reason and "StarRocks filtered" in letters[0].reason
    assert_exact(sr_settings, registry, events, letters=1)


def test_a_key_longer_than_starrocks_keys_hold_is_dead_lettered_before_any_load(
    sr_settings: Settings, registry: SpecRegistry
) -> None:
    """A merchant id (tenant, and a rollup dimension) longer than 128 bytes: refused
    by Tally with the column named, before its deltas are planned. Not proven on the
    stand-in: StarRocks' own limit (its documented 128 bytes is assumed)."""
    events = _events(200, seed=5)
    bad = dict(events[0], txn_id="txn_long", merchant_id="m" * 200, event_id="evt_long")
    store = StarRocksStore(sr_settings, registry)
    store.commit("payments", [*events, bad], {(TOPIC, 0): OffsetRange(0, len(events) + 1)})
    letters = store.pending("payments")
    store.close()
    assert [d.key for d in letters] == [b"txn_long"]
    assert "merchant_id is 200 bytes" in letters[0].reason
    assert_exact(sr_settings, registry, events, letters=1)


def test_publish_timeouts_and_transient_fails_mid_batch_are_retried_to_the_same_result(
    sr_settings: Settings, registry: SpecRegistry, standin: StandIn
) -> None:
    """A rollup load fails transiently (the runner retries the batch: the same call
    again) and the base load is a Publish Timeout (waited out, not loaded again).
    Not proven on the stand-in: StarRocks' publish timing (scripted here)."""
    events = _events(600, seed=11)
    batches = _batches(events)
    store = StarRocksStore(sr_settings, registry)
    store.commit("payments", *batches[0][:2], dead_letters=batches[0][2])
    standin.fail_next(
        ddl.rollup_table(sr_settings, registry.get("payments").rollups[1]), "transient"
    )
    standin.fail_next(ddl.base_table(sr_settings, registry.get("payments")), "publish_timeout")
    rows, ranges, letters = batches[1]
    with pytest.raises(StoreUnavailable):
        store.commit("payments", rows, ranges, dead_letters=letters)
    store.commit("payments", rows, ranges, dead_letters=letters)  # the runner's retry
    for rows, ranges, letters in batches[2:]:
        store.commit("payments", rows, ranges, dead_letters=letters)
    store.close()
    db = sr_settings.starrocks.database
    sent = Counter(x["label"] for x in standin.stats.loads if x["db"] == db)
    assert max(sent.values()) <= 2  # a label is sent again only after it failed
    assert_exact(sr_settings, registry, events, letters=len(batches))

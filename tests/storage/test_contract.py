"""The storage contract (:mod:`storage.protocol`), held against every OLAP backend.

Each test speaks only the protocol: ``open_store``/``open_reader`` for the backend
under test, ``commit`` with offsets and dead letters, the compactor, the outbox,
``lookup``, and SQL built as sqlglot trees rendered in the backend's own dialect.
A new backend adds itself to ``BACKENDS`` below (with a fixture that starts its
engine) and must pass the whole suite unchanged; what it cannot pass is a capability
it declares, and the test skips or branches on that capability, never on its name.

StarRocks runs on the session's stand-in (tests/storage/starrocks/standin.py), or on a
real StarRocks where ``TALLY_TEST_STARROCKS`` names one; on the stand-in these tests
do not prove StarRocks' own SQL semantics or planner (DuckDB runs the transpiled
statements), its tablet versions, compaction, replication or publish protocol.

Druid runs on the session's real Kafka and Druid (requested only by its param, so the
embedded param needs no Java): each test has its own topic namespace, datasource and
supervisor, terminated at teardown. Its commits become readable once the supervisor
ingested them (``visible_on_commit`` false): ``Backend.commit`` then polls, with a
deadline, until the reader counts every row committed.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from sqlglot import exp

from storage import (
    DeadLetterRecord,
    OffsetRange,
    OlapReader,
    OlapStore,
    StoredPosition,
    open_reader,
    open_store,
)
from storage.protocol import CommitResult, PartitionStats, TopicPartition
from storage.sql import subquery
from tally.errors import InvalidArgument, OffsetMismatch, PartitionDamaged
from tally.settings import Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.factories import T0, latest_by_key, payment, reference_rollup

BACKENDS = ["embedded", "druid", "starrocks"]
VISIBLE_WITHIN_S = 180.0  # a first commit waits for the supervisor's first task


@dataclass
class Backend:
    settings: Settings
    store: OlapStore
    reader: OlapReader
    committed: int = 0  # rows written by commits so far (what the reader must count)

    @property
    def tp(self) -> TopicPartition:
        """Partition 0 of the source topic (in the test's namespace)."""
        return (self.settings.topic("payments.v1"), 0)

    def commit(
        self,
        rows: Sequence[Mapping[str, Any]],
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        dead_letters: Sequence[DeadLetterRecord] = (),
    ) -> CommitResult:
        """``store.commit``, then, where a commit is not visible at once, wait until the
        reader counts every row committed so far (a deadline, not a sleep)."""
        result = self.store.commit("payments", rows, offsets, dead_letters=dead_letters)
        self.committed += result.rows_written
        if not self.store.capabilities.visible_on_commit:
            deadline = time.monotonic() + VISIBLE_WITHIN_S
            while (seen := self.stored_rows()) < self.committed:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{seen} of {self.committed} rows visible after commit")
                time.sleep(0.5)
        return result

    def stored_rows(self) -> int:
        return self.reader.ingest_figures("payments").datasets["payments"][1]

    def sql(self, tree: exp.Expression) -> list[list[Any]]:
        self.reader.refresh()
        return self.reader.query(tree.sql(dialect=self.reader.capabilities.sql_dialect)).rows


@contextlib.contextmanager
def _druid_settings(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Settings]:
    """The session's Kafka and Druid, topics of its own, its supervisor submitted;
    terminated afterwards (its task would hold one of the indexer's slots)."""
    from ingest.kafka import ensure_topics
    from storage.druid.overlord import Overlord
    from storage.druid.supervisor import supervisors
    from tests.conftest import broker_settings
    from tests.storage.druid.conftest import druid_settings

    kafka = request.getfixturevalue("kafka_broker")
    druid = request.getfixturevalue("druid")
    registry: SpecRegistry = request.getfixturevalue("registry")
    base = broker_settings(kafka, data_dir, partitions=2)
    base = base.model_copy(update={"topic_namespace": f"c{uuid.uuid4().hex[:10]}_"})
    settings = druid_settings(druid, data_dir, base)
    spec = registry.get("payments")
    ensure_topics(settings, [spec])
    overlord = Overlord(settings)
    submitted = supervisors(settings, spec)
    if request.node.get_closest_marker("rollups") is None:  # each costs a task slot
        submitted = dict(list(submitted.items())[:1])
    for name, body in submitted.items():
        overlord.apply(name, body)
    try:
        yield settings
    finally:
        druid.drop(*submitted)


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, data_dir: Path, registry: SpecRegistry
) -> Iterator[Backend]:
    with contextlib.ExitStack() as stack:
        if request.param == "druid":  # the fixtures that start Kafka and Druid, for it alone
            settings = stack.enter_context(_druid_settings(request, data_dir))
        elif request.param == "starrocks":  # the stand-in, or TALLY_TEST_STARROCKS
            settings = request.getfixturevalue("starrocks").settings(data_dir, registry)
        else:
            settings = Settings(
                data_dir=data_dir,
                store=StoreSettings(backend=request.param, gc_grace_s=0.0, orphan_grace_s=0.0),
            )
        store = open_store(settings, registry)
        stack.callback(store.close)
        reader = open_reader(settings, registry)
        stack.callback(reader.close)
        assert store.capabilities == reader.capabilities
        assert store.capabilities.name == request.param
        yield Backend(settings, store, reader)


def _rows(b: Backend, keys: list[str], tenant: str | None = None) -> dict[str, dict[str, Any]]:
    b.reader.refresh()
    table = b.reader.lookup("payments", keys, tenant=tenant)
    return {r["txn_id"]: r for r in table.to_pylist()}


def _rollup(b: Backend, name: str, dims: list[str]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    metrics = ["count", "gross_amount", "canceled_amount", "net_amount"]
    keys = [exp.column("bucket"), *(exp.column(d) for d in dims)]
    tree = (
        exp.select(*keys, *(exp.alias_(exp.Sum(this=exp.column(m)), m) for m in metrics))
        .from_(subquery(b.reader.relation(name), "r"))
        .group_by(*keys)
    )
    out = {}
    for row in b.sql(tree):
        values = tuple(int(v) for v in row[len(keys) :])
        if any(values):
            out[tuple(row[: len(keys)])] = values
    return out


def _base_stats(b: Backend) -> list[PartitionStats]:
    return [s for s in b.store.partition_stats("payments") if s.datasource == "payments"]


def test_the_latest_version_of_every_key_wins_whatever_the_arrival_order(
    backend: Backend, registry: SpecRegistry
) -> None:
    spec = registry.get("payments")
    offered = [
        payment("a", 2, canceled_amount=10_000),
        payment("a", 1),  # older, arrives later: never overwrites
        payment("b", 1),
        payment("b", 1, event_id="b-v1-z", amount=7_000),  # equal version: greater event_id
        payment("c", 3, canceled_amount=2_000),
    ]
    backend.commit(offered[:2], {backend.tp: OffsetRange(0, 2)})
    backend.commit(offered[2:], {backend.tp: OffsetRange(2, 5)})
    stored = _rows(backend, ["a", "b", "c"])
    expected = latest_by_key(spec, offered)
    assert {k: (r["version"], r["event_id"]) for k, r in stored.items()} == {
        k: (r["version"], r["event_id"]) for k, r in expected.items()
    }
    assert stored["b"]["amount"] == 7_000
    assert backend.store.stored_offsets("payments") == {backend.tp: 5}


def test_a_commit_whose_start_offsets_differ_from_the_stored_ones_is_fenced(
    backend: Backend,
) -> None:
    caps = backend.store.capabilities
    if not caps.transactional_offsets:
        pytest.skip(
            f"{caps.name}: transactional_offsets is false: offsets are the Kafka group's,"
            " fenced by group generation, and a commit without a group has none"
        )
    backend.commit([payment("a")], {backend.tp: OffsetRange(0, 4)})
    with pytest.raises(OffsetMismatch):
        backend.commit([payment("zombie")], {backend.tp: OffsetRange(2, 6)})
    assert _rows(backend, ["zombie"]) == {}
    assert backend.store.stored_offsets("payments") == {backend.tp: 4}


def test_dead_letters_commit_with_their_batch_and_leave_the_outbox_once_published(
    backend: Backend, registry: SpecRegistry
) -> None:
    letter = DeadLetterRecord(
        id="payments:payments.v1:0:1",
        datasource="payments",
        sink="olap",
        topic="payments.v1",
        partition=0,
        offset=1,
        key=b"x",
        value=b"{not json",
        reason="undecodable",
        failed_at=T0.timestamp(),
    )
    backend.commit([payment("a")], {backend.tp: OffsetRange(0, 2)}, dead_letters=[letter])
    if not backend.store.capabilities.dead_letter_outbox:
        # In the dead-letter topic already, produced in the commit's own transaction.
        from ingest.deadletter import list_dead_letters

        assert backend.store.outbox.pending("payments") == []
        listed = list_dead_letters(backend.settings, registry.get("payments"))
        assert [(d["id"], d["reason"], d["value"]) for d in listed] == [
            (letter.id, "undecodable", "{not json")
        ]
        assert backend.store.stored_offsets("payments") == {backend.tp: 2}
        return
    assert [d.id for d in backend.store.outbox.pending("payments")] == [letter.id]
    backend.store.outbox.mark_published([(letter.id, 0, 0)])
    assert backend.store.outbox.pending("payments") == []


@pytest.mark.rollups
def test_rollups_equal_the_aggregate_of_the_latest_states_after_late_cancellations(
    backend: Backend, registry: SpecRegistry
) -> None:
    caps = backend.store.capabilities
    if not caps.rollup_datasources:
        pytest.skip(
            f"{caps.name}: rollup_datasources is false: no rollup is stored yet"
            " (aggregates are computed from the merged base)"
        )
    spec = registry.get("payments")
    approvals = [
        payment(f"t{i}", approved_at=T0 + timedelta(hours=i % 30), merchant_id=f"m{i % 3}")
        for i in range(60)
    ]
    cancels = [
        payment(
            f"t{i}",
            2,
            approved_at=T0 + timedelta(hours=i % 30),
            merchant_id=f"m{i % 3}",
            canceled_amount=3_000 if i % 2 else 10_000,
        )
        for i in range(0, 60, 4)
    ]
    backend.commit(approvals, {backend.tp: OffsetRange(0, 60)})
    backend.commit(cancels, {backend.tp: OffsetRange(60, 75)})
    backend.commit(cancels[:3], {backend.tp: OffsetRange(75, 78)})  # redelivery
    latest = latest_by_key(spec, approvals + cancels)
    for rollup in spec.rollups:
        want = reference_rollup(spec, rollup.name, latest)
        got = _rollup(backend, rollup.name, list(rollup.dimensions))
        assert {tuple(map(str, k)): v for k, v in got.items()} == {
            tuple(map(str, k)): v for k, v in want.items()
        }
    assert all(r.groups_repaired == 0 for r in backend.store.rebuild_rollups("payments"))


def test_compaction_changes_no_answer_and_late_rows_are_counted(backend: Backend) -> None:
    caps = backend.store.capabilities
    if not caps.manual_compaction:
        pytest.skip(f"{caps.name}: manual_compaction is false: Tally does not compact it")
    if caps.compacts_in_engine:
        pytest.skip(
            f"{caps.name}: compacts_in_engine: a compaction is an engine task over its time"
            " chunks, proven with the watcher on the real engine (tests/storage/druid/"
            "test_compaction.py)"
        )
    for i in range(4):
        backend.commit(
            [payment(f"k{i}"), payment("k0", i + 2)],
            {backend.tp: OffsetRange(2 * i, 2 * i + 2)},
        )
    before = _rows(backend, [f"k{i}" for i in range(4)])
    (stats,) = _base_stats(backend)
    assert stats.late_rows == 7  # every row written (k0 v1 lost in its batch): T0 is long past
    partition = stats.partition
    start, end = backend.store.partition_range("payments", partition)
    assert start <= T0 < end
    result = backend.store.compactor.compact("payments", partition)
    assert result is not None and result.replaced_segments == 4 and result.rows_out == 4
    assert _rows(backend, [f"k{i}" for i in range(4)]) == before
    backend.store.compactor.collect_garbage()
    assert _rows(backend, [f"k{i}" for i in range(4)]) == before
    (after,) = _base_stats(backend)
    assert after.late_rows == 0 and after.last_compacted_at is not None  # healed
    assert "payments_hourly" in backend.store.datasource_names("payments")


def test_the_tenant_of_a_lookup_is_enforced(backend: Backend) -> None:
    backend.commit([payment("mine"), payment("theirs", merchant_id="m2")])
    assert set(_rows(backend, ["mine", "theirs"], tenant="m1")) == {"mine"}


def test_repair_replaces_a_stored_row_whatever_its_version(backend: Backend) -> None:
    caps = backend.store.capabilities
    if not caps.repair:
        pytest.skip(f"{caps.name}: repair is false: its stored rows cannot be rewritten by key")
    backend.commit([payment("a", 5, amount=1), payment("b")])
    result = backend.store.repair("payments", [payment("a", 2, amount=9_000)], ["b"])
    assert (result.rows_written, result.keys_removed) == (1, 1)
    stored = _rows(backend, ["a", "b"])
    assert list(stored) == ["a"] and (stored["a"]["version"], stored["a"]["amount"]) == (2, 9_000)


def test_a_position_keeps_the_log_it_is_of_and_an_operator_reset(backend: Backend) -> None:
    """``tally ingest reset`` writes through ``reset_positions``; the next commit must
    continue from it, and keep the log it names (``ingest.positions``)."""
    store = backend.store
    backend.commit([payment("k1", 1)], {backend.tp: OffsetRange(0, 3, "log-A")})
    assert store.stored_positions("payments")[backend.tp].log == "log-A"
    store.reset_positions(
        "payments", {backend.tp: StoredPosition(0, "log-B", "to earliest by ops at now")}
    )
    reset = store.stored_positions("payments")[backend.tp]
    assert (reset.offset, reset.log, reset.reset) == (0, "log-B", "to earliest by ops at now")
    if store.capabilities.transactional_offsets:  # fenced from the reset position on
        with pytest.raises(OffsetMismatch):
            store.commit("payments", [payment("k2", 1)], {backend.tp: OffsetRange(3, 4, "log-B")})
    backend.commit([payment("k2", 1)], {backend.tp: OffsetRange(0, 2, "log-B")})
    after = store.stored_positions("payments")[backend.tp]
    assert (after.offset, after.log) == (2, "log-B")


def test_stored_files_are_checked_and_a_lost_partition_is_restored_whole(
    backend: Backend,
) -> None:
    """Where Tally keeps the files (``checks_files``), a lost one is found, its
    partition refused by the reader and restored whole; elsewhere the engine keeps its
    own, nothing is reported and a restore is refused with the reason."""
    caps = backend.store.capabilities
    rows = [payment("a"), payment("b", amount=7)]
    backend.commit(rows)
    assert backend.store.check_files(full=True, found_by="contract") == []
    assert backend.reader.damaged() == {}
    if not caps.checks_files:
        with pytest.raises(InvalidArgument, match="keeps and repairs its own files"):
            backend.store.restore_partitions("payments", {})
        return
    (seg,) = backend.store.live_segments("payments")
    Path(seg.path).unlink()
    (found,) = backend.store.check_files(full=False, found_by="contract")
    assert (found.partition, found.reason) == (seg.partition, "file missing")
    assert backend.reader.damaged() == {"payments": {seg.partition: "file missing"}}
    with pytest.raises(PartitionDamaged):
        _rows(backend, ["a", "b"])
    backend.store.restore_partitions("payments", {seg.partition: pa.Table.from_pylist(rows)})
    assert backend.store.check_files(full=True, found_by="contract") == []
    assert {k: r["amount"] for k, r in _rows(backend, ["a", "b"]).items()} == {"a": 10_000, "b": 7}

"""The storage contract (:mod:`storage.protocol`), held against every OLAP backend.

Each test speaks only the protocol: ``open_store``/``open_reader`` for the backend
under test, ``commit`` with offsets and dead letters, the compactor, the outbox,
``lookup``, and SQL built as sqlglot trees rendered in the backend's own dialect.
A new backend adds itself to ``BACKENDS`` below (with a fixture that starts its
engine) and must pass the whole suite unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlglot import exp

from storage import DeadLetterRecord, OffsetRange, OlapReader, OlapStore, open_reader, open_store
from storage.protocol import PartitionStats
from tally.errors import OffsetMismatch
from tally.settings import Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.factories import T0, latest_by_key, payment, reference_rollup

BACKENDS = ["embedded"]
TP = ("payments.v1", 0)


@dataclass
class Backend:
    settings: Settings
    store: OlapStore
    reader: OlapReader

    def sql(self, tree: exp.Expression) -> list[list[Any]]:
        self.reader.refresh()
        return self.reader.query(tree.sql(dialect=self.reader.capabilities.sql_dialect)).rows


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, data_dir: Path, registry: SpecRegistry
) -> Iterator[Backend]:
    settings = Settings(
        data_dir=data_dir,
        store=StoreSettings(backend=request.param, gc_grace_s=0.0, orphan_grace_s=0.0),
    )
    store = open_store(settings, registry)
    reader = open_reader(settings, registry)
    assert store.capabilities == reader.capabilities
    assert store.capabilities.name == request.param
    yield Backend(settings, store, reader)
    reader.close()
    store.close()


def _rows(b: Backend, keys: list[str], tenant: str | None = None) -> dict[str, dict[str, Any]]:
    b.reader.refresh()
    table = b.reader.lookup("payments", keys, tenant=tenant)
    return {r["txn_id"]: r for r in table.to_pylist()}


def _rollup(b: Backend, name: str, dims: list[str]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    metrics = ["count", "gross_amount", "canceled_amount", "net_amount"]
    keys = [exp.column("bucket"), *(exp.column(d) for d in dims)]
    tree = (
        exp.select(*keys, *(exp.alias_(exp.Sum(this=exp.column(m)), m) for m in metrics))
        .from_(exp.table_(name))
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
    backend.store.commit("payments", offered[:2], {TP: OffsetRange(0, 2)})
    backend.store.commit("payments", offered[2:], {TP: OffsetRange(2, 5)})
    stored = _rows(backend, ["a", "b", "c"])
    expected = latest_by_key(spec, offered)
    assert {k: (r["version"], r["event_id"]) for k, r in stored.items()} == {
        k: (r["version"], r["event_id"]) for k, r in expected.items()
    }
    assert stored["b"]["amount"] == 7_000
    assert backend.store.stored_offsets("payments") == {TP: 5}


def test_a_commit_whose_start_offsets_differ_from_the_stored_ones_is_fenced(
    backend: Backend,
) -> None:
    backend.store.commit("payments", [payment("a")], {TP: OffsetRange(0, 4)})
    with pytest.raises(OffsetMismatch):
        backend.store.commit("payments", [payment("zombie")], {TP: OffsetRange(2, 6)})
    assert _rows(backend, ["zombie"]) == {}
    assert backend.store.stored_offsets("payments") == {TP: 4}


def test_dead_letters_commit_with_their_batch_and_leave_the_outbox_once_published(
    backend: Backend,
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
    backend.store.commit("payments", [payment("a")], {TP: OffsetRange(0, 2)}, dead_letters=[letter])
    assert [d.id for d in backend.store.outbox.pending("payments")] == [letter.id]
    backend.store.outbox.mark_published([(letter.id, 0, 0)])
    assert backend.store.outbox.pending("payments") == []


def test_rollups_equal_the_aggregate_of_the_latest_states_after_late_cancellations(
    backend: Backend, registry: SpecRegistry
) -> None:
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
    backend.store.commit("payments", approvals, {TP: OffsetRange(0, 60)})
    backend.store.commit("payments", cancels, {TP: OffsetRange(60, 75)})
    backend.store.commit("payments", cancels[:3], {TP: OffsetRange(75, 78)})  # redelivery
    latest = latest_by_key(spec, approvals + cancels)
    for rollup in spec.rollups:
        want = reference_rollup(spec, rollup.name, latest)
        got = _rollup(backend, rollup.name, list(rollup.dimensions))
        assert {tuple(map(str, k)): v for k, v in got.items()} == {
            tuple(map(str, k)): v for k, v in want.items()
        }
    assert all(r.groups_repaired == 0 for r in backend.store.rebuild_rollups("payments"))


def test_compaction_changes_no_answer_and_late_rows_are_counted(backend: Backend) -> None:
    if not backend.store.capabilities.manual_compaction:
        pytest.skip(f"{backend.store.capabilities.name} compacts by itself")
    for i in range(4):
        backend.store.commit(
            "payments",
            [payment(f"k{i}"), payment("k0", i + 2)],
            {TP: OffsetRange(2 * i, 2 * i + 2)},
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
    backend.store.commit("payments", [payment("mine"), payment("theirs", merchant_id="m2")])
    assert set(_rows(backend, ["mine", "theirs"], tenant="m1")) == {"mine"}


def test_repair_replaces_a_stored_row_whatever_its_version(backend: Backend) -> None:
    backend.store.commit("payments", [payment("a", 5, amount=1), payment("b")])
    result = backend.store.repair("payments", [payment("a", 2, amount=9_000)], ["b"])
    assert (result.rows_written, result.keys_removed) == (1, 1)
    stored = _rows(backend, ["a", "b"])
    assert list(stored) == ["a"] and (stored["a"]["version"], stored["a"]["amount"]) == (2, 9_000)

"""Resident rollups: the in-memory answer stays equal to the files' answer as commits
append tails, compaction replaces files and the byte budget evicts partitions."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from rollups.request import AggregateRequest
from rollups.router import bind, route, run
from storage import OlapReader, open_reader
from storage.embedded import resident
from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.factories import METHODS, T0, payment

RANGE = AggregateRequest(
    start=T0 - timedelta(hours=9),  # Seoul midnight, Jan 1
    end=T0 - timedelta(hours=9) + timedelta(days=62),
    granularity="day",
    group_by=("method", "status"),
)


def _with(req: AggregateRequest, **changes: object) -> AggregateRequest:
    return dataclasses.replace(req, **changes)  # type: ignore[arg-type]


def _files_answer(
    reader: OlapReader, spec: DatasourceSpec, req: AggregateRequest
) -> list[list[Any]]:
    """The same routed query, run by DuckDB over the rollup's files."""
    routed = route(spec, req)
    relation = reader.relation(routed.source, req.start, req.end)
    return reader.query(bind(routed, relation).sql(reader.capabilities.sql_dialect)).rows


def _resident(reader: OlapReader, spec: DatasourceSpec, req: AggregateRequest) -> list[list[Any]]:
    routed, result = run(reader, spec, req)
    assert routed.source != "base"
    return result.rows


def _row(i: int, version: int = 1) -> dict[str, Any]:
    amount = 1_000 * (1 + i % 7)
    return payment(
        f"t{i}",
        version,
        approved_at=T0 + timedelta(hours=7 * i),
        merchant_id=f"m{i % 3}",
        method=METHODS[i % len(METHODS)],
        amount=amount,
        canceled_amount=0 if version == 1 else amount if i % 2 else 500,
    )


def _commit(store: EmbeddedStore, start: int, n: int, *, cancel_from: int | None = None) -> None:
    rows = [_row(i) for i in range(start, start + n)]
    if cancel_from is not None:
        rows += [_row(i, 2) for i in range(cancel_from, cancel_from + n // 2)]
    store.commit("payments", rows)


def test_tails_and_compaction_keep_the_answer_exact(
    store: EmbeddedStore, reader: OlapReader, payments_spec: DatasourceSpec
) -> None:
    assert isinstance(reader, EmbeddedReader)
    requests = [
        RANGE,
        _with(RANGE, filters={"merchant_id": ("m1",)}),
        _with(RANGE, filters={"merchant_id": ("m0", "m2", "nobody")}, granularity="month"),
        _with(RANGE, group_by=(), filters={"merchant_id": ("nobody",)}),
    ]
    _commit(store, 0, 100)
    for req in requests:
        assert _resident(reader, payments_spec, req) == _files_answer(reader, payments_spec, req)
    loads, entries = reader.resident.loads, len(reader.resident._entries)
    assert loads > 0

    _commit(store, 100, 60, cancel_from=10)  # appends: read as tails, no rebuild
    for req in requests:
        assert _resident(reader, payments_spec, req) == _files_answer(reader, payments_spec, req)
    new_partitions = len(reader.resident._entries) - entries
    assert reader.resident.loads == loads + new_partitions  # only partitions never seen
    loads = reader.resident.loads
    assert reader.resident.tail_reads > 0

    for stats in store.partition_stats():
        if stats.segments > 1:
            store.compactor.compact(stats.datasource, stats.partition)
    for req in requests:
        assert _resident(reader, payments_spec, req) == _files_answer(reader, payments_spec, req)
    assert reader.resident.loads > loads  # replaced files: rebuilt, not patched


def test_cancellations_that_net_a_group_to_zero_hide_it(
    store: EmbeddedStore, reader: OlapReader, payments_spec: DatasourceSpec
) -> None:
    req = _with(RANGE, group_by=("status",), filters={"merchant_id": ("m1",)})
    store.commit("payments", [payment("a", merchant_id="m1", approved_at=T0)])
    assert [r[1] for r in _resident(reader, payments_spec, req)] == ["DONE"]
    store.commit(
        "payments", [payment("a", 2, merchant_id="m1", approved_at=T0, canceled_amount=10_000)]
    )
    rows = _resident(reader, payments_spec, req)
    assert [r[1] for r in rows] == ["CANCELED"]  # the DONE group netted to zero
    assert rows == _files_answer(reader, payments_spec, req)


@pytest.mark.parametrize("budget_mb", [0, 64])
def test_byte_budget_bounds_what_stays_resident(
    store: EmbeddedStore,
    settings: Settings,
    registry: SpecRegistry,
    payments_spec: DatasourceSpec,
    budget_mb: int,
) -> None:
    _commit(store, 0, 400)  # 400 × 7 h spans two months: two rollup partitions
    conf = settings.model_copy(update={"store": StoreSettings(resident_rollups_mb=budget_mb)})
    reader = open_reader(conf, registry)
    assert isinstance(reader, EmbeddedReader)
    try:
        for _ in range(2):
            assert _resident(reader, payments_spec, RANGE) == _files_answer(
                reader, payments_spec, RANGE
            )
        entries = len(reader.resident._entries)
        assert entries == 1 if budget_mb == 0 else entries > 1
    finally:
        reader.close()


def test_tails_fold_into_the_base_once_large(
    store: EmbeddedStore,
    reader: OlapReader,
    payments_spec: DatasourceSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(reader, EmbeddedReader)
    monkeypatch.setattr(resident, "TAIL_FOLD_ROWS", 8)
    _commit(store, 0, 10)
    _resident(reader, payments_spec, RANGE)
    loads = reader.resident.loads
    for start in range(10, 40, 5):
        _commit(store, start, 5, cancel_from=start - 5)
        rows = _resident(reader, payments_spec, RANGE)
        assert rows == _files_answer(reader, payments_spec, RANGE)
        for entry in reader.resident._entries.values():
            assert sum(t.num_rows for t in entry.tails) <= 8
    assert reader.resident.loads == loads  # folded in place, never re-read from files


def test_views_rebuild_lazily_and_a_cursor_keeps_one_generation(
    store: EmbeddedStore, reader: OlapReader
) -> None:
    assert isinstance(reader, EmbeddedReader)
    count = "SELECT count(*) FROM payments"
    daily = "SELECT sum(count) FROM payments_daily"
    store.commit("payments", [payment("a", approved_at=T0)])
    assert reader.query(count).rows == [[1]]
    store.commit("payments", [payment("b", approved_at=T0)])
    # Naming only the rollup rebuilds only its views; the base view waits...
    assert reader.query(daily).rows == [[2]]
    generation = reader.snapshot.generation
    assert reader._installed[("main", "payments_daily")] == generation
    assert reader._installed[("main", "payments")] < generation
    # ...until a query names it (names are case-insensitive).
    assert reader.query(count.replace("payments", '"PAYMENTS"')).rows == [[2]]

    pinned = reader.cursor(f"{count}; {daily}")
    try:
        store.commit("payments", [payment("c", approved_at=T0)])
        assert reader.query(count).rows == [[3]]  # the base view moved on, alone
        # The pinned cursor still sees both views at its own generation.
        assert pinned.execute(count).fetchall() == [(2,)]
        assert pinned.execute(daily).fetchall() == [(2,)]
    finally:
        pinned.close()

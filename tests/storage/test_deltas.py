"""Retraction deltas are exact: summing every commit's deltas equals recomputing the
rollup from the latest state of each key, for any sequence of state changes."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.deltas import SIGN, signed_deltas
from storage.embedded.segments import base_schema
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths
from tests.factories import (
    METHODS,
    T0,
    assert_summed_deltas_equal_reference,
    latest_by_key,
    normalise,
    payment,
)

SPEC = SpecRegistry.load(builtin_spec_paths()).get("payments")

state = st.builds(
    lambda key, hours, amount, cancel, method, merchant: payment(
        key,
        1,
        approved_at=T0 + timedelta(hours=hours),
        amount=amount * 100,
        canceled_amount=min(amount, cancel) * 100,
        method=method,
        merchant_id=merchant,
    ),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 72),
    st.integers(1, 50),
    st.integers(0, 60),
    st.sampled_from(METHODS),
    st.sampled_from(["m1", "m2"]),
)


def _signed(spec: DatasourceSpec, rows: list[tuple[dict[str, Any], int]]) -> pa.Table:
    schema = base_schema(spec)
    cols = list(spec.rollup_state_columns)
    table = pa.Table.from_pylist([r for r, _ in rows], schema=schema).select(cols)
    return table.append_column(SIGN, pa.array([s for _, s in rows], pa.int64()))


@settings(max_examples=150, deadline=None)
@given(changes=st.lists(state, min_size=1, max_size=25))
def test_summed_deltas_equal_recomputation(changes: list[dict[str, Any]]) -> None:
    current: dict[str, dict[str, Any]] = {}
    totals: dict[str, dict[tuple[Any, ...], list[int]]] = {
        r.name: defaultdict(lambda: [0, 0, 0, 0]) for r in SPEC.rollups
    }
    for version, new in enumerate(changes, start=1):
        new = dict(new, version=version, event_id=f"e{version}")
        old = current.get(new["txn_id"])
        signed = [(new, 1)] + ([(old, -1)] if old else [])
        current[new["txn_id"]] = new
        for rollup in SPEC.rollups:
            deltas = signed_deltas(SPEC, rollup, _signed(SPEC, signed))
            dims = ["bucket", *rollup.dimensions]
            for row in deltas.to_pylist():
                acc = totals[rollup.name][tuple(normalise(row[d]) for d in dims)]
                for i, m in enumerate(SPEC.parsed_metrics):
                    acc[i] += row[m.name]
                assert any(row[m.name] for m in SPEC.parsed_metrics)  # zero groups dropped
    latest = latest_by_key(SPEC, current.values())
    assert_summed_deltas_equal_reference(SPEC, totals, latest)

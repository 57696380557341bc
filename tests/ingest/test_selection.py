"""A sink's selection applied to decoded batches (ingest/selection.py): the sample is
by key (every version of a kept key is kept, none of a skipped one), its share is
what the spec says within a binomial bound, and filtered rows are counted apart."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from ingest.decode import Decoded
from ingest.selection import Selector
from tally.specs import DatasourceSpec, SinkSelection
from tally.specs.selection import in_sample


def _with(spec: DatasourceSpec, **search: Any) -> DatasourceSpec:
    return spec.model_copy(update={"sinks": {"search": SinkSelection(**search)}})


def _batch(rows: list[tuple[str, int, str]]) -> Decoded:
    table = pa.table(
        {
            "txn_id": [k for k, _v, _s in rows],
            "version": pa.array([v for _k, v, _s in rows], pa.int64()),
            "status": [s for _k, _v, s in rows],
        }
    )
    return Decoded(
        table, partitions=[i % 3 for i in range(len(rows))], offsets=list(range(len(rows)))
    )


def test_the_kept_share_is_the_sample_within_a_binomial_bound(
    payments_spec: DatasourceSpec,
) -> None:
    n, share = 100_000, 0.1
    selected = Selector(_with(payments_spec, sample=share), "search").apply(
        _batch([(f"txn_{i:07}", 1, "DONE") for i in range(n)])
    )
    sigma = math.sqrt(n * share * (1 - share))  # ~95 keys
    assert abs(selected.kept - n * share) < 5 * sigma, selected.kept
    assert selected.kept + selected.out_of_sample == n and selected.filtered == 0
    assert len(selected.decoded.offsets) == selected.decoded.table.num_rows == selected.kept


events = st.lists(
    st.tuples(
        st.sampled_from([f"k{i}" for i in range(40)]),
        st.integers(1, 6),
        st.sampled_from(["DONE", "CANCELED"]),
    ),
    max_size=120,
)


@given(batches=st.lists(events, min_size=1, max_size=4), share=st.sampled_from([0.2, 0.5, 0.9]))
def test_every_version_of_a_kept_key_is_kept_and_none_of_a_skipped_one(
    payments_spec: DatasourceSpec, batches: list[list[tuple[str, int, str]]], share: float
) -> None:
    selector = Selector(_with(payments_spec, sample=share), "search")
    for rows in batches:
        got = selector.apply(_batch(rows))
        table = got.decoded.table
        kept = list(
            zip(
                table.column("txn_id").to_pylist(), table.column("version").to_pylist(), strict=True
            )
        )
        assert kept == [(k, v) for k, v, _s in rows if in_sample(k, share)]  # order kept too
        offsets = [i for i, (k, _v, _s) in enumerate(rows) if in_sample(k, share)]
        assert got.decoded.offsets == offsets
        assert got.kept + got.out_of_sample + got.filtered == len(rows)


def test_filtered_rows_are_counted_apart_from_the_sample(payments_spec: DatasourceSpec) -> None:
    spec = _with(payments_spec, sample=0.5, filter="status = 'CANCELED'")
    rows = [(f"k{i}", 1, "CANCELED" if i % 3 == 0 else "DONE") for i in range(3000)]
    got = Selector(spec, "search").apply(_batch(rows))
    sampled = [r for r in rows if in_sample(r[0], 0.5)]
    assert got.out_of_sample == len(rows) - len(sampled)
    assert got.kept == sum(1 for r in sampled if r[2] == "CANCELED")
    assert got.filtered == len(sampled) - got.kept
    assert set(got.decoded.table.column("status").to_pylist()) == {"CANCELED"}


def test_a_sink_without_a_selection_keeps_the_batch_as_it_is(payments_spec: DatasourceSpec) -> None:
    batch = _batch([("k1", 1, "DONE")])
    assert Selector(_with(payments_spec, sample=0.1), "olap").apply(batch).decoded is batch

"""In-batch deduplication keeps exactly the greatest (version, event_id) per key."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from storage.deltas import latest_in_batch
from storage.embedded.segments import base_schema
from tally.specs import SpecRegistry, builtin_spec_paths
from tests.factories import latest_by_key, payment

SPEC = SpecRegistry.load(builtin_spec_paths()).get("payments")

event = st.builds(
    lambda k, v, e: payment(k, v, event_id=f"e{e}"),
    st.sampled_from("abcde"),
    st.integers(1, 4),
    st.integers(0, 3),
)


@given(events=st.lists(event, max_size=40))
def test_latest_in_batch_equals_reference(events: list[dict[str, object]]) -> None:
    table = pa.Table.from_pylist(events, schema=base_schema(SPEC))
    got = {
        r["txn_id"]: (r["version"], r["event_id"]) for r in latest_in_batch(SPEC, table).to_pylist()
    }
    want = {k: (r["version"], r["event_id"]) for k, r in latest_by_key(SPEC, events).items()}
    assert got == want
    assert len(got) == len(set(got))

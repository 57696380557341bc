"""The relay's key state (``storage.keystate``): the deltas it plans, summed over any
sequence of batches — versions out of order, duplicates, equal versions, keys moving
bucket and merchant, a restart from the changelog between any two batches — equal
each rollup recomputed from the latest state per key."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.kafka import base_config
from storage.embedded.segments import base_schema
from storage.keystate import KeyStates, encode_state, restore
from tally.specs import SpecRegistry, builtin_spec_paths
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.factories import (
    METHODS,
    T0,
    assert_summed_deltas_equal_reference,
    latest_by_key,
    normalise,
    payment,
)

SPEC = SpecRegistry.load(builtin_spec_paths()).get("payments")
KEYS = ["a", "b", "c", "d"]

event = st.builds(
    lambda key, version, tie, hours, amount, cancel, method, merchant: payment(
        key,
        version,
        event_id=f"{key}-v{version}-{tie}",
        approved_at=T0 + timedelta(hours=hours),
        amount=amount * 100,
        canceled_amount=min(amount, cancel) * 100,
        method=method,
        merchant_id=merchant,
    ),
    st.sampled_from(KEYS),
    st.integers(1, 4),
    st.sampled_from("xy"),
    st.integers(0, 72),
    st.integers(1, 50),
    st.integers(0, 60),
    st.sampled_from(METHODS),
    st.sampled_from(["m1", "m2"]),
)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=base_schema(SPEC)).select(list(SPEC.columns))


def _partition(key: str) -> int:
    return KEYS.index(key) % 2  # a key always on one partition, as Kafka keys are


def _reloaded(states: KeyStates) -> KeyStates:
    """A new process: its state read back from the changelog's encoding."""
    fresh = KeyStates(SPEC)
    for part, entries in states.partitions.items():
        fresh.load(part, [(k.encode(), encode_state(v)) for k, v in entries.items()])
    return fresh


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(st.lists(event, min_size=1, max_size=8), min_size=1, max_size=6),
    restarts=st.sets(st.integers(0, 5)),
)
def test_summed_deltas_equal_the_rollups_of_the_latest_states(
    batches: list[list[dict[str, Any]]], restarts: set[int]
) -> None:
    states = KeyStates(SPEC)
    totals: dict[str, dict[tuple[Any, ...], list[int]]] = {
        r.name: defaultdict(lambda: [0] * len(SPEC.parsed_metrics)) for r in SPEC.rollups
    }
    for i, batch in enumerate(batches):
        if i in restarts:
            states = _reloaded(states)
        plan = states.plan(_table(batch), [_partition(r["txn_id"]) for r in batch])
        states.apply(plan)
        for rollup in SPEC.rollups:
            deltas = plan.deltas.get(rollup.name)
            for row in [] if deltas is None else deltas.to_pylist():
                group = tuple(normalise(row[d]) for d in ["bucket", *rollup.dimensions])
                for j, metric in enumerate(SPEC.parsed_metrics):
                    totals[rollup.name][group][j] += row[metric.name]
    latest = latest_by_key(SPEC, [r for batch in batches for r in batch])
    assert_summed_deltas_equal_reference(SPEC, totals, latest)
    remembered = {k: v[:2] for p in states.partitions.values() for k, v in p.items()}
    assert remembered == {k: (r["version"], r["event_id"]) for k, r in latest.items()}


def test_a_plan_changes_nothing_until_applied_and_a_replayed_batch_is_stale() -> None:
    """An aborted transaction's plan is never applied: planning the batch again gives
    the same deltas; once applied, the same batch again is all stale."""
    states = KeyStates(SPEC)
    batch = _table([payment("a"), payment("b", merchant_id="m2")])
    first = states.plan(batch, [0, 1])
    again = states.plan(batch, [0, 1])
    assert {n: t.to_pylist() for n, t in first.deltas.items()} == {
        n: t.to_pylist() for n, t in again.deltas.items()
    }
    assert len(states) == 0 and first.deltas
    states.apply(first)
    replay = states.plan(batch, [0, 1])
    assert replay.deltas == {} and replay.states == [] and replay.stale == 2


def test_a_dropped_partition_forgets_its_keys_only() -> None:
    states = KeyStates(SPEC)
    states.apply(states.plan(_table([payment("a"), payment("b")]), [0, 1]))
    states.drop([1])
    assert set(states.partitions) == {0} and len(states) == 1


@pytest.mark.parametrize("keys", [1, 1000])
def test_a_state_survives_its_changelog_encoding(keys: int) -> None:
    states = KeyStates(SPEC)
    rows = [payment(f"k{i}", 2, canceled_amount=i) for i in range(keys)]
    states.apply(states.plan(_table(rows), [i % 3 for i in range(keys)]))
    assert _reloaded(states).partitions == states.partitions


def test_a_restore_waits_for_a_transaction_still_open_on_the_changelog(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """Kafka: a read_committed consumer reaches end-of-partition at the last stable
    offset, before a transaction still open there (a killed relay's, or one whose
    markers reach the changelog after the consumer offsets'). Restoring must wait
    for it: states committed with the offsets a new owner resumes from are not
    skipped (a CI run doubled 7 hourly groups when they were)."""
    settings = broker_settings(kafka_broker, tmp_path, partitions=1)
    topic = settings.topic("changelog")
    admin = AdminClient(base_config(settings))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    states = KeyStates(SPEC)
    states.apply(states.plan(_table([payment("k1", 3)]), [0]))
    value = encode_state(states.partitions[0]["k1"])
    prod = Producer(base_config(settings) | {"transactional.id": f"{topic}.writer"})
    prod.init_transactions(30)
    prod.begin_transaction()
    prod.produce(topic, key=b"k1", value=value, partition=0)
    prod.flush(30)  # in the log, not yet committed
    restored = KeyStates(SPEC)
    reader = threading.Thread(
        target=restore, args=(restored, base_config(settings), topic, [0]), daemon=True
    )
    reader.start()
    reader.join(2)
    assert reader.is_alive(), "the restore ended before the open transaction settled"
    prod.commit_transaction(30)
    reader.join(60)
    assert not reader.is_alive()
    assert restored.partitions == states.partitions

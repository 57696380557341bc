"""Property: whatever the delivery order, duplication, batching and compaction, the
merged view equals "latest version per key" and every rollup equals its
recomputation from that — at every committed point."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import open_reader, open_store
from storage.embedded.resident import summed
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.factories import METHODS, T0, latest_by_key, normalise, payment, reference_rollup

BASE_COLUMNS = (
    "txn_id",
    "version",
    "event_id",
    "merchant_id",
    "status",
    "method",
    "amount",
    "canceled_amount",
    "approved_at",
)


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Events for a few keys: versioned states, some moving partition or tenant,
    ties on version with different event ids, and redelivered duplicates."""
    events: list[dict[str, Any]] = []
    for k in range(draw(st.integers(1, 6))):
        txn = f"t{k}"
        day = draw(st.integers(0, 40))
        hour = draw(st.integers(0, 23))
        merchant = draw(st.sampled_from(["m1", "m2"]))
        amount = draw(st.integers(1, 50)) * 1000
        canceled = 0
        for version in range(1, draw(st.integers(1, 4)) + 1):
            if version > 1:
                canceled = min(amount, canceled + draw(st.integers(0, 3)) * 1000)
                if draw(st.integers(0, 3)) == 0:  # the contract forbids it; the store copes
                    day = draw(st.integers(0, 40))
                if draw(st.integers(0, 14)) == 0:
                    merchant = "m2" if merchant == "m1" else "m1"
            row = payment(
                txn,
                version,
                merchant_id=merchant,
                amount=amount,
                canceled_amount=canceled,
                approved_at=T0 + timedelta(days=day, hours=hour),
                method=draw(st.sampled_from(METHODS)),
            )
            events.append(row)
            if draw(st.integers(0, 5)) == 0:  # same version, another event id
                twin = dict(
                    row, event_id=row["event_id"] + "-b", method=draw(st.sampled_from(METHODS))
                )
                events.append(twin)
            if draw(st.integers(0, 3)) == 0:  # redelivery
                events.append(dict(row))
    return events


def _merged(reader: Any) -> set[tuple[Any, ...]]:
    cols = ", ".join(BASE_COLUMNS)
    return {
        tuple(normalise(v) for v in r) for r in reader.query(f"SELECT {cols} FROM payments").rows
    }


def _expected(spec: DatasourceSpec, events: Sequence[Mapping[str, Any]]) -> set[tuple[Any, ...]]:
    latest = latest_by_key(spec, events)
    return {tuple(normalise(row[c]) for c in BASE_COLUMNS) for row in latest.values()}


def _rollup(reader: Any, spec: DatasourceSpec, name: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    rollup = spec.rollup(name)
    keys = ["bucket", *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    rows = reader.query(f"SELECT {', '.join(keys + metrics)} FROM {name}").rows
    return {tuple(normalise(v) for v in r[: len(keys)]): tuple(r[len(keys) :]) for r in rows}


def _resident(
    reader: Any, spec: DatasourceSpec, name: str
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """The same rollup as the reader holds it in memory (tails included), summed."""
    rollup = spec.rollup(name)
    keys = ["bucket", *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    state = summed(reader.rollup_state(name), keys, metrics).to_pylist()
    return {
        tuple(normalise(r[k]) for k in keys): tuple(r[m] for m in metrics)
        for r in state
        if any(r[m] for m in metrics)
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=histories(), seed=st.integers(0, 2**32 - 1), batches=st.integers(1, 6))
def test_merged_view_and_rollups_match_reference(
    registry: SpecRegistry, events: list[dict[str, Any]], seed: int, batches: int
) -> None:
    spec = registry.get("payments")
    rng = random.Random(seed)
    rng.shuffle(events)  # out-of-order delivery
    cuts = sorted(rng.sample(range(1, len(events)), min(batches - 1, len(events) - 1)))
    chunks = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Settings(data_dir=Path(tmp), store=StoreSettings(gc_grace_s=0.0, orphan_grace_s=0.0))
        store = open_store(conf, registry)
        reader = open_reader(conf, registry)
        assert isinstance(store, EmbeddedStore)
        try:
            seen: list[dict[str, Any]] = []
            for chunk in chunks:
                store.commit("payments", chunk)
                seen.extend(chunk)
                _maybe_compact(store, rng)
                assert _merged(reader) == _expected(spec, seen)
                latest = latest_by_key(spec, seen)
                for rollup in spec.rollups:
                    reference = {
                        tuple(normalise(v) for v in k): v
                        for k, v in reference_rollup(spec, rollup.name, latest).items()
                    }
                    assert _rollup(reader, spec, rollup.name) == reference
                    assert _resident(reader, spec, rollup.name) == reference
            # A writer started afresh rebuilds its key index from segments alone and
            # must treat a replay of everything as the no-op it is.
            fresh = open_store(conf, registry)
            result = fresh.commit("payments", events)
            assert result.rows_written == 0 and result.segments == 0
            fresh.close()
            assert _merged(reader) == _expected(spec, events)
        finally:
            store.close()
            reader.close()


def _maybe_pack(store: EmbeddedStore, rng: random.Random) -> None:
    """Pack a random set of single-segment partitions into one file (packs and
    partitions already in other packs included)."""
    live = store.live_segments("payments")
    counts: dict[str, int] = {}
    for seg in live:
        counts[seg.partition] = counts.get(seg.partition, 0) + 1
    single = [s for s in live if counts[s.partition] == 1]
    if len(single) >= 2 and rng.random() < 0.5:
        store.compactor.pack(
            "payments", [s.id for s in rng.sample(single, rng.randint(2, len(single)))]
        )


def _maybe_compact(store: EmbeddedStore, rng: random.Random) -> None:
    _maybe_pack(store, rng)
    live = store.live_segments()
    if not live or rng.random() < 0.4:
        return
    target = rng.choice(live)
    same = [s for s in live if (s.datasource, s.partition) == (target.datasource, target.partition)]
    if rng.random() < 0.5:
        chosen = None  # the whole partition
    else:
        chosen = [s.id for s in rng.sample(same, rng.randint(1, len(same)))]
    store.compactor.compact(target.datasource, target.partition, chosen)
    if rng.random() < 0.5:
        store.compactor.collect_garbage()

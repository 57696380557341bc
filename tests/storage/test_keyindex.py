"""The columnar key index against a dict model: random batches, snapshots, crashes and
rebuilds from the segments must all agree with "greatest (version, event_id) per key"."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import open_store
from storage.deltas import latest_in_batch
from storage.embedded import keyindex, keysnapshot
from storage.embedded.fingerprint import event_order, key_fingerprints
from storage.embedded.keyindex import KeyIndex, Slots, merge_runs
from storage.embedded.segments import base_schema, to_table
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.factories import METHODS, T0, payment

# Every id shares its first 8 bytes, so a tie on version is decided by the resolver.
PREFIX = "evt-2026-12-"
STATE = ("approved_at", "merchant_id", "method", "status", "currency", "amount", "canceled_amount")


def _key(n: int) -> str:
    return f"t{n}" + "-" * (n % 3 * 7)  # 2 to 17 bytes: across 8-byte words


@st.composite
def batches(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    out = []
    for _ in range(draw(st.integers(1, 8))):
        rows = []
        for _ in range(draw(st.integers(1, 25))):
            key = _key(draw(st.integers(0, 30)))
            amount = draw(st.integers(1, 9)) * 1000
            rows.append(
                payment(
                    key,
                    draw(st.integers(1, 4)),
                    event_id=PREFIX + draw(st.sampled_from(["a", "b", "ab", "c"])),
                    merchant_id=draw(st.sampled_from(["m1", "m2", "m3"])),
                    approved_at=T0 + timedelta(days=draw(st.integers(0, 40))),
                    amount=amount,
                    canceled_amount=draw(st.sampled_from([0, amount])),
                    method=draw(st.sampled_from(METHODS)),
                )
            )
        out.append(rows)
    return out


Model = dict[str, dict[str, Any]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=30),
    st.integers(0, 29),
)
def test_a_fingerprint_depends_on_its_string_alone(strings: list[str], cut: int) -> None:
    """Not on the batch it came in: the longest string sets the padding, and an
    Arrow slice starts its offsets anywhere in the buffer."""
    together = key_fingerprints(pa.array(strings))
    alone = [key_fingerprints(pa.array([s])) for s in strings]
    assert together[0].tolist() == [a[0][0] for a in alone]
    assert together[1].tolist() == [a[1][0] for a in alone]
    tail = pa.array(strings).slice(min(cut, len(strings) - 1))
    assert key_fingerprints(tail)[0].tolist() == together[0][len(strings) - len(tail) :].tolist()
    orders = event_order(pa.array(strings))
    assert orders[1].tolist() == [event_order(pa.array([s]))[1][0] for s in strings]
    # The prefix orders ids as their bytes do wherever their first 8 bytes differ.
    for a, pa_, b, pb in zip(strings, orders[0], strings[1:], orders[0][1:], strict=False):
        ka, kb = a.encode()[:8], b.encode()[:8]
        if ka != kb and ka.rstrip(b"\0") != kb.rstrip(b"\0"):
            assert (pa_ < pb) == (ka < kb)


def _apply(spec: DatasourceSpec, index: KeyIndex, model: Model, rows: list[dict[str, Any]]) -> None:
    """One batch through the index's version guard, checked against the model's."""
    table = latest_in_batch(spec, to_table(rows, base_schema(spec)))
    batch = table.to_pylist()
    new = index.encode(table)
    slots = index.find(new["h1"], new["h2"])
    stored = index.gather(slots, ["version", "eprefix", "ehash"])

    def tie(at: np.ndarray) -> np.ndarray:
        return np.array([batch[i]["event_id"] > model[batch[i]["txn_id"]]["event_id"] for i in at])

    accept = index.newer(new, slots, stored, tie)
    expected = [
        r["txn_id"] not in model
        or (r["version"], r["event_id"])
        > (model[r["txn_id"]]["version"], model[r["txn_id"]]["event_id"])
        for r in batch
    ]
    assert accept.tolist() == expected
    index.update(slots.take(accept), {n: a[accept] for n, a in new.items()})
    for r, ok in zip(batch, expected, strict=True):
        if ok:
            model[r["txn_id"]] = r


def _contents(index: KeyIndex) -> set[tuple[Any, ...]]:
    """Every entry: its fingerprint, version, event-id order and decoded state."""
    out: set[tuple[Any, ...]] = set()
    for r, run in enumerate(index.runs):
        n = len(run["h1"])
        slots = Slots(np.full(n, r, np.int16), np.arange(n, dtype=np.int64))
        schema = base_schema(index.spec)
        state = index.state_table(slots, pa.schema([schema.field(c) for c in STATE])).to_pylist()
        for i in range(n):
            ident = tuple(int(run[c][i]) for c in ("h1", "h2", "version", "eprefix", "ehash"))
            out.add((*ident, *(state[i][c] for c in STATE)))
    return out


def _matches_model(index: KeyIndex, model: Model) -> None:
    keys = [_key(i) for i in range(31)]
    assert index.contains(keys).tolist() == [k in model for k in keys]
    assert len(index) == len(model)
    located = index.locate(keys)
    assert set(located) == set(model)
    held = sorted(model)
    slots = index.find(*_fingerprints(held))
    schema = base_schema(index.spec)
    got = index.state_table(slots, pa.schema([schema.field(c) for c in STATE])).to_pylist()
    versions = index.gather(slots, ["version"])["version"].tolist()
    for key, state, version in zip(held, got, versions, strict=True):
        assert version == model[key]["version"]
        assert state == {c: model[key][c] for c in STATE}


def _fingerprints(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from storage.embedded.fingerprint import key_fingerprints

    return key_fingerprints(pa.array(keys, pa.string()))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=batches())
def test_index_agrees_with_a_dict_model(
    payments_spec: DatasourceSpec, history: list[list[dict[str, Any]]], tmp_path_factory: Any
) -> None:
    index = KeyIndex(payments_spec)
    model: Model = {}
    for rows in history:
        _apply(payments_spec, index, model, rows)
        _matches_model(index, model)
    # A snapshot loads back to the same entries, and keeps agreeing after more batches.
    where = tmp_path_factory.mktemp("snap")
    index.seq = 7
    before = _contents(index)
    keysnapshot.save(where, index, identity=42)
    loaded = keysnapshot.load(where, payments_spec, identity=42, repairs=0, seq=7)
    assert loaded is not None and _contents(loaded) == before and len(loaded.runs) <= 1
    for rows in history[:2]:
        _apply(payments_spec, loaded, model, rows)
    _matches_model(loaded, model)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([70_000, 131_072, 300_001]))
def test_a_long_run_is_searched_through_its_directory_as_searchsorted_would(
    payments_spec: DatasourceSpec, seed: int, size: int
) -> None:
    """Runs longer than the cache-sized ones go through the leading-bits directory:
    its answer must be ``searchsorted``'s for members, gaps, repeats and extremes."""
    rng = np.random.default_rng(seed)
    hs = np.sort(rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True))
    hs[size // 2 : size // 2 + 5] = hs[size // 2]  # a first hash shared by keys
    needles = np.concatenate(
        [
            rng.choice(hs, 2_000),
            rng.integers(0, 2**64 - 1, 2_000, dtype=np.uint64, endpoint=True),
            np.array([0, 1, hs[0], hs[-1], 2**64 - 1], np.uint64),
        ]
    )
    needles.sort()
    index = KeyIndex(payments_spec)
    assert len(hs) > keyindex._SMALL_RUN
    got = index._search(0, hs, needles)
    assert got.tolist() == np.searchsorted(hs, needles).tolist()
    assert index.nbytes > 0  # the directory is counted in the index's bytes


def test_a_first_hash_shared_by_two_keys_is_told_apart_by_the_second(
    payments_spec: DatasourceSpec,
) -> None:
    index = KeyIndex(payments_spec)
    run: dict[str, np.ndarray] = {
        "h1": np.array([5, 5, 5, 9], np.uint64),
        "h2": np.array([1, 2, 3, 1], np.uint32),
        "version": np.array([10, 20, 30, 40], np.int64),
    }
    index.runs = [run, {k: v[:0] for k, v in run.items()}]
    slots = index.find(np.array([5, 5, 9, 5, 7], np.uint64), np.array([3, 1, 1, 4, 1], np.uint32))
    assert slots.found.tolist() == [True, True, True, False, False]
    assert index.gather(slots.take(slots.found), ["version"])["version"].tolist() == [30, 10, 40]
    merged = merge_runs(
        {k: v.copy() for k, v in run.items()},
        {
            "h1": np.array([5, 6], np.uint64),
            "h2": np.array([9, 9], np.uint32),
            "version": np.array([1, 2], np.int64),
        },
    )
    assert merged["h1"].tolist() == [5, 5, 5, 5, 6, 9]
    assert sorted(merged["version"].tolist()) == [1, 2, 10, 20, 30, 40]


def _store(data_dir: Path, registry: SpecRegistry) -> EmbeddedStore:
    settings = Settings(data_dir=data_dir, store=StoreSettings(gc_grace_s=0.0))
    st_ = open_store(settings, registry)
    assert isinstance(st_, EmbeddedStore)
    return st_


def _rebuilt(store: EmbeddedStore, spec: DatasourceSpec) -> KeyIndex:
    core = store.core
    with core.catalog.read():
        live = core.catalog.live_segments(spec.name)
        index = KeyIndex(spec)
        index.load(core.duck, core.reads(spec, live), core.catalog.current_seq())
    return index


def _caught_up(store: EmbeddedStore, spec: DatasourceSpec) -> KeyIndex:
    with store.core.catalog.write():
        return store.core.key_index(spec)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=batches(), crash_after=st.integers(0, 7))
def test_snapshot_crash_and_rebuild_agree_with_the_segments(
    registry: SpecRegistry,
    history: list[list[dict[str, Any]]],
    crash_after: int,
    tmp_path_factory: Any,
) -> None:
    """A writer snapshots, commits more and dies without closing: the next writer's
    index (the snapshot caught up from the segments) is the one rebuilt from them."""
    spec = registry.get("payments")
    data = tmp_path_factory.mktemp("store")
    first = _store(data, registry)
    for i, rows in enumerate(history):
        first.commit("payments", rows, now=T0)
        if i == crash_after:
            first.core.save_indexes()
    second = _store(data, registry)  # the first is never closed: it crashed
    path = data / "keyindex" / "payments.npz"
    assert path.exists()
    resumed = _caught_up(second, spec)
    assert _contents(resumed) == _contents(_rebuilt(second, spec))
    second.close()
    # A clean stop snapshots the caught-up index; the next start loads it whole.
    third = _store(data, registry)
    with third.core.catalog.read():
        seq = third.core.catalog.current_seq()
        identity = third.core.catalog.identity()
    loaded = keysnapshot.load(data / "keyindex", spec, identity, 0, seq)
    assert loaded is not None and loaded.seq == seq
    assert _contents(loaded) == _contents(_rebuilt(third, spec))
    third.close()


def test_a_snapshot_of_another_catalog_or_before_a_repair_is_not_used(
    registry: SpecRegistry, tmp_path: Path
) -> None:
    spec = registry.get("payments")
    store = _store(tmp_path / "a", registry)
    store.commit("payments", [payment("t1", 1), payment("t2", 1)], now=T0)
    store.close()
    snapshots = tmp_path / "a" / "keyindex"
    saved = keysnapshot.load(snapshots, spec, identity=0, repairs=0, seq=10**9)
    assert saved is None  # another catalog's identity
    other = _store(tmp_path / "a", registry)
    with other.core.catalog.read():
        identity = other.core.catalog.identity()
        seq = other.core.catalog.current_seq()
    assert keysnapshot.load(snapshots, spec, identity, 0, seq) is not None
    assert keysnapshot.load(snapshots, spec, identity, 1, seq) is None  # a repair since
    assert keysnapshot.load(snapshots, spec, identity, 0, seq - 1) is None  # ahead
    # A repair lowers t1's version: the writer rebuilds, never trusting the snapshot.
    other.repair("payments", [payment("t1", 1, amount=5)], remove_keys=["t2"])
    index = _caught_up(other, spec)
    assert index.contains(["t1", "t2"]).tolist() == [True, False]
    other.close()


@pytest.mark.parametrize("torn", [b"", b"PK\x03\x04 not a zip"])
def test_a_torn_snapshot_is_rebuilt_from_the_segments(
    registry: SpecRegistry, tmp_path: Path, torn: bytes
) -> None:
    spec = registry.get("payments")
    store = _store(tmp_path, registry)
    store.commit("payments", [payment("t1", 2), payment("t2", 1)], now=T0)
    store.close()
    (tmp_path / "keyindex" / "payments.npz").write_bytes(torn)
    again = _store(tmp_path, registry)
    index = _caught_up(again, spec)
    assert index.contains(["t1", "t2", "t3"]).tolist() == [True, True, False]
    result = again.commit("payments", [payment("t1", 1), payment("t3", 1)], now=T0)
    assert result.stale_rows == 1 and result.rows_written == 1
    again.close()

"""``tally verify``: every sink against the log, and ``--repair``.

End to end on each real broker (the development broker, then Apache Kafka) and real ingestion into
both sinks: a clean run finds nothing; one deliberately corrupted OLAP row, a bogus
key, a bogus rollup delta and two damaged search documents are each found with the
right kind and a non-zero exit; ``--repair`` fixes them and says so; a second run
finds nothing and the naive reference model agrees; events published but not yet
ingested are reported as lagging, not as differences. The comparison rules, the
store's repair primitive and the search backends' force-replace are tested on their
own below.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compaction.differences import compare_rows, compare_search
from compaction.logstate import SOURCE_OFFSET, latest_rows
from ingest.kafka import ensure_topics
from producers.generate import GeneratorConfig, rfc3339
from producers.malformed import Wire
from producers.publish import Publisher
from search.elastic_index import ElasticIndex
from search.protocol import Doc
from search.tantivy_index import TantivyIndex
from storage import OlapReader, open_reader, open_store
from storage.embedded.catalog import NewSegment
from storage.embedded.segments import file_digest, to_table
from storage.embedded.store import EmbeddedStore
from storage.schema import rollup_schema
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import bucket_key
from tests.brokers import Broker
from tests.cli import Ran, tally
from tests.compaction.verifying import ingest_until_idle as _ingest
from tests.compaction.verifying import verify_json as _verify
from tests.conftest import broker_settings
from tests.factories import T0, latest_by_key, normalise, payment, reference_rollup
from tests.ingest.conftest import env_for, free_port
from tests.ingest.reference import Published, build
from tests.ingest.verify import assert_exact
from tests.search.conftest import MakeElastic, es_url, make_elastic  # noqa: F401 (fixtures)

SEOUL = ZoneInfo("Asia/Seoul")


@pytest.fixture
def kafka(broker: Broker, data_dir: Path, registry: SpecRegistry) -> Settings:
    settings = broker_settings(broker, data_dir, partitions=3)
    ensure_topics(settings, registry)
    return settings


# --- helpers ---------------------------------------------------------------------------------


def _wire(row: dict[str, Any]) -> Wire:
    value = orjson.dumps({k: rfc3339(v) if isinstance(v, datetime) else v for k, v in row.items()})
    return Wire(row["txn_id"].encode(), value, None)


def _publish(settings: Settings, published: Published, wires: list[Wire]) -> None:
    Publisher(settings, settings.topic("payments.v1")).send(wires)
    for wire in wires:
        if wire.malformed is None:
            event = orjson.loads(wire.value)
            for name in ("occurred_at", "approved_at"):
                event[name] = datetime.fromisoformat(event[name])
            published.good.append(event)
        else:
            published.malformed[wire.value] += 1


def _corrupt_row(reader: OlapReader, key: str, catalog: Path) -> tuple[str, int]:
    """Rewrite, in place, the live segment holding ``key``'s row with amount + 1, and
    record the new file's size and digest: a wrong row written whole (a writer's bug),
    not a damaged file (``test_damage.py``)."""
    ((path, version, amount),) = reader.query(
        "SELECT filename, version, amount FROM raw.payments WHERE txn_id = ? AND NOT _deleted"
        " ORDER BY version DESC, event_id DESC LIMIT 1",
        [key],
    ).rows
    table = pq.read_table(path)
    mask = pc.and_(pc.equal(table["txn_id"], key), pc.equal(table["version"], version))
    column = table.schema.get_field_index("amount")
    table = table.set_column(column, "amount", pc.if_else(mask, amount + 1, table["amount"]))
    pq.write_table(table, path)
    with sqlite3.connect(catalog) as con:
        con.execute(
            "UPDATE segments SET digest = ?, file_bytes = ? WHERE path = ?",
            (file_digest(Path(path)), Path(path).stat().st_size, path),
        )
    return path, amount


def _corrupt_rollup(store: EmbeddedStore, spec: DatasourceSpec, group: list[Any]) -> None:
    """Slip a bogus delta (+1 payment of 500) into an existing payments_daily group."""
    rollup = spec.rollup("payments_daily")
    bucket, merchant, currency = group
    bogus = {
        "bucket": bucket,
        "merchant_id": merchant,
        "currency": currency,
        "count": 1,
        "gross_amount": 500,
        "canceled_amount": 0,
        "net_amount": 500,
    }
    part = bucket_key(bucket, "month", SEOUL)
    table = to_table([bogus], rollup_schema(spec, rollup))
    path, size, _digest = store.core.segments.write(
        table, rollup.name, part, [("bucket", "ascending")]
    )
    with store.core.catalog.write():
        store.core.catalog.add_segments([NewSegment(rollup.name, part, str(path), 1, size)])
        store.core.catalog.bump_generation()


def _doc(row: dict[str, Any], **changes: Any) -> Doc:
    fields = {
        "key": row["txn_id"],
        "tenant": row["merchant_id"],
        "time": row["approved_at"],
        "version": row["version"],
        "event_id": row["event_id"],
        "text": {f: row[f] for f in ("order_id", "order_name", "customer_name", "card_last4")},
    }
    return Doc(**(fields | changes))


def _what(diffs: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {(d["sink"], d["kind"], d.get("key") or d.get("rollup")) for d in diffs}


# --- end to end ------------------------------------------------------------------------------


def test_verify_finds_a_corruption_in_each_sink_and_repair_fixes_it(
    kafka: Settings, registry: SpecRegistry
) -> None:
    settings = kafka
    spec = registry.get("payments")
    config = GeneratorConfig(
        transactions=250,
        merchants=6,
        days=3,
        seed=3,
        cancel_rate=0.3,
        duplicate_rate=0.05,
        out_of_order_rate=0.1,
    )
    published = build(config, malformed_rate=0.03)
    broken = Wire(b"txn-broken", b'{"txn_id": "txn-broken", "version": ', "broken_json")
    published.wires.append(broken)
    published.malformed[broken.value] += 1
    assert len(published.wires) > 250 and published.malformed
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    _ingest(settings, registry)

    code, clean = _verify(settings)
    latest = latest_by_key(spec, published.good)
    assert code == 0 and clean["differences"] == [] and clean["remaining"] == 0, clean
    assert clean["keys_checked"] == len(latest)
    assert clean["dead_lettered"] == sum(published.malformed.values())
    assert clean["lagging"] == {}

    # One corruption per sink (two for search), and a key the log never had.
    once = sorted(k for k, r in latest.items() if r["version"] == 1)
    twice = sorted(k for k, r in latest.items() if r["version"] >= 2)
    k_row, k_stale, k_gone = once[0], twice[0], once[1]
    reader = open_reader(settings, registry)
    store = open_store(settings, registry)
    assert isinstance(store, EmbeddedStore)
    try:
        _path, amount = _corrupt_row(reader, k_row, settings.catalog_path)
        group = reader.query("SELECT bucket, merchant_id, currency FROM payments_daily LIMIT 1")
        _corrupt_rollup(store, spec, group.rows[0])
        ghost_at = latest[k_row]["approved_at"]
        store.commit("payments", [payment("ghost-1", merchant_id="m-ghost", approved_at=ghost_at)])
    finally:
        store.close()
        reader.close()
    index = TantivyIndex(settings, spec)
    index.replace(0, [_doc(dict(latest[k_stale]), version=1, event_id="bogus")])
    assert index.delete([k_gone]) == 1
    index.close()

    code, found = _verify(settings)
    assert code == 1 and found["remaining"] == len(found["differences"]) == 7, found
    assert _what(found["differences"]) == {
        ("olap", "corrupt", k_row),
        ("olap", "unexpected", "ghost-1"),
        ("rollup", "corrupt", "payments_daily"),  # the bogus delta
        ("rollup", "unexpected", "payments_daily"),  # the ghost's groups
        ("rollup", "unexpected", "payments_hourly"),
        ("search", "stale", k_stale),
        ("search", "missing", k_gone),
    }
    by_kind = {(d["sink"], d["kind"]): d for d in found["differences"]}
    assert by_kind["olap", "corrupt"]["expected"] == {"amount": amount}
    assert by_kind["olap", "corrupt"]["found"] == {"amount": amount + 1}
    bogus = by_kind["rollup", "corrupt"]
    assert bogus["found"]["count"] == bogus["expected"]["count"] + 1
    assert bogus["found"]["gross_amount"] == bogus["expected"]["gross_amount"] + 500
    assert by_kind["search", "stale"]["found"] == {"version": 1, "event_id": "bogus"}
    assert all(
        d["group"]["merchant_id"] == "m-ghost"
        for d in found["differences"]
        if d["sink"] == "rollup" and d["kind"] == "unexpected"
    )
    assert found["repaired"] == [] and found["lagging"] == {}

    code, fixed = _verify(settings, "--repair")
    assert code == 0 and fixed["remaining"] == 0, json.dumps(fixed)
    actions = {
        (d["sink"], d["kind"], d.get("key") or d.get("rollup"), d["action"])
        for d in fixed["repaired"]
    }
    assert actions == {
        ("olap", "corrupt", k_row, "rewrote"),
        ("olap", "unexpected", "ghost-1", "removed"),
        ("rollup", "corrupt", "payments_daily", "rebuilt"),
        ("rollup", "unexpected", "payments_daily", "rebuilt"),
        ("rollup", "unexpected", "payments_hourly", "rebuilt"),
        ("search", "stale", k_stale, "replaced"),
        ("search", "missing", k_gone, "replaced"),
    }

    code, again = _verify(settings)
    assert code == 0 and again["differences"] == [], again
    assert_exact(settings, registry, published)  # the naive reference agrees

    # Published but not ingested yet: lagging, not a difference. Then ingestion (with
    # writers that start after the repair) catches up and everything agrees again.
    cancel = dict(latest[k_row]) | {
        "version": latest[k_row]["version"] + 1,
        "event_id": f"{k_row}-late-cancel",
        "event_type": "payment.canceled",
        "canceled_amount": latest[k_row]["amount"],
        "status": "CANCELED",
    }
    fresh = [payment(f"fresh-{i}", approved_at=T0 + timedelta(hours=i)) for i in range(5)]
    _publish(settings, published, [_wire(cancel), *map(_wire, fresh)])
    code, behind = _verify(settings)
    assert code == 0 and behind["differences"] == [], behind
    for sink in ("olap", "search"):
        assert behind["lagging"][sink]["keys"] == 6, behind["lagging"]
        assert sum(behind["lagging"][sink]["behind"].values()) == 6
    assert behind["lagging"]["rollup"]["groups"] > 0
    _ingest(settings, registry)
    code, done = _verify(settings)
    assert code == 0 and done["differences"] == [] and done["lagging"] == {}, done
    assert_exact(settings, registry, published)


def test_verify_errors_are_one_line(kafka: Settings, tmp_path: Path) -> None:
    def error(ran: Ran) -> str:
        assert ran.code == 1 and "Traceback" not in ran.err, ran.err
        (line,) = [x for x in ran.err.splitlines() if x.startswith("error:")]
        return line

    env = env_for(kafka)
    assert "unknown datasource" in error(tally("verify", "--datasource", "nope", env=env))
    gone = env | {"TALLY_TOPIC_NAMESPACE": "missing-ns."}
    assert "does not exist" in error(tally("verify", "--datasource", "payments", env=gone))
    down = env | {"TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    assert "payments.v1" in error(tally("verify", "--datasource", "payments", env=down))


# --- the store's repair primitive ------------------------------------------------------------


def _merged(reader: OlapReader) -> dict[str, tuple[Any, ...]]:
    rows = reader.query("SELECT txn_id, version, event_id, amount, approved_at FROM payments")
    out = {r[0]: tuple(normalise(v) for v in r[1:]) for r in rows.rows}
    assert len(out) == len(rows.rows), "a key appears twice in the merged view"
    return out


def _rollups(reader: OlapReader, spec: DatasourceSpec) -> dict[str, Any]:
    out = {}
    for rollup in spec.rollups:
        width = 1 + len(rollup.dimensions)
        rows = reader.query(f"SELECT * FROM {rollup.name}").rows
        out[rollup.name] = {tuple(normalise(v) for v in r[:width]): tuple(r[width:]) for r in rows}
    return out


def _reference(spec: DatasourceSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    latest = latest_by_key(spec, rows)
    return {
        r.name: {
            tuple(normalise(v) for v in k): v
            for k, v in reference_rollup(spec, r.name, latest).items()
        }
        for r in spec.rollups
    }


def test_repair_rewrites_packed_and_moved_rows_and_running_writers_follow(
    store: EmbeddedStore,
    reader: OlapReader,
    settings: Settings,
    registry: SpecRegistry,
    payments_spec: DatasourceSpec,
) -> None:
    spec = payments_spec
    day = timedelta(days=1)
    truth = [
        payment(
            f"p{d}{i}", merchant_id=f"m{i % 2}", approved_at=T0 + d * day, amount=1000 * (i + 1)
        )
        for d in range(4)
        for i in range(3)
    ]
    store.commit("payments", truth)
    live = store.live_segments("payments")
    assert store.compactor.pack("payments", [s.id for s in live]) is not None  # 4 days in one file
    running = open_store(settings, registry)  # another writer, its key index loaded
    assert isinstance(running, EmbeddedStore)
    try:
        running.commit("payments", [payment("w0", approved_at=T0 + 5 * day)])
        truth.append(payment("w0", approved_at=T0 + 5 * day))
        # Damage: a bogus newer version that moved p01 to day 3, and a key never sent.
        store.commit("payments", [payment("p01", 9, approved_at=T0 + 3 * day, amount=1)])
        store.commit("payments", [payment("ghost", approved_at=T0 + day)])
        assert _merged(reader)["p01"][0] == 9

        # A key changed since the caller looked is left alone.
        moved = store.repair("payments", [truth[0]], expect={"p00": (5, "other")})
        assert moved.skipped == ("p00",) and moved.partitions == ()

        p01 = next(r for r in truth if r["txn_id"] == "p01")
        p12 = next(r for r in truth if r["txn_id"] == "p12") | {"amount": 7}  # same version
        result = store.repair(
            "payments",
            [p01, p12],
            ["ghost"],
            expect={"p01": (9, "p01-v9"), "p12": (1, "p12-v1"), "ghost": (1, "ghost-v1")},
        )
        assert result.skipped == () and result.rows_written == 2 and result.keys_removed == 1
        assert set(result.partitions) == {"2026-01-01", "2026-01-02", "2026-01-04"}
        truth = [r for r in truth if r["txn_id"] != "p12"] + [p12]
        want = {
            r["txn_id"]: (r["version"], r["event_id"], r["amount"], normalise(r["approved_at"]))
            for r in truth
        }
        assert _merged(reader) == want
        for part in result.partitions:
            store.rebuild_rollups("payments", part)
        assert _rollups(reader, spec) == _reference(spec, truth)

        # The running writer's index reloads: p01's real v2 is not "older than v9", and
        # its rollup retraction takes v1's state, not the bogus one's.
        cancel = payment(
            "p01", 2, merchant_id="m1", approved_at=T0, amount=2000, canceled_amount=2000
        )
        assert running.commit("payments", [cancel]).rows_written == 1
        truth.append(cancel)
        assert _merged(reader)["p01"][:3] == (2, "p01-v2", 2000)
        assert _rollups(reader, spec) == _reference(spec, truth)
    finally:
        running.close()
    # The pack still serves the days it was not replaced for.
    packed = [s for s in store.live_segments("payments") if s.packed]
    assert {s.partition for s in packed} == {"2026-01-03"}


# --- search backends: replace and delete ------------------------------------------------------


@pytest.mark.parametrize("backend", ["tantivy", "elasticsearch"])
def test_replace_bypasses_the_version_guard_and_delete_removes(
    backend: str, tmp_path: Path, payments_spec: DatasourceSpec, request: pytest.FixtureRequest
) -> None:
    if backend == "tantivy":
        index: TantivyIndex | ElasticIndex = TantivyIndex(
            Settings(data_dir=tmp_path), payments_spec
        )
    else:
        make: MakeElastic = request.getfixturevalue("make_elastic")
        index = make()
    row = payment("k1", 3)
    index.upsert(1, [_doc(row), _doc(payment("k2")), _doc(payment("k3", 5))])
    index.commit(1, None)
    # Same version, other time: an upsert refuses it, replace takes it.
    moved = _doc(row, time=T0 + timedelta(days=2))
    assert index.upsert(1, [moved]).written == 0
    assert index.replace(1, [moved]).replaced == 1
    assert index.locate(["k1"]) == {"k1": T0 + timedelta(days=2)}
    # Older than stored: tantivy replaces; Elasticsearch deletes and refuses for now.
    lower = index.replace(2, [_doc(payment("k3", 2))])
    if backend == "tantivy":
        assert lower.replaced == 1 and index.all_versions()["k3"] == (2, "k3-v2")
    else:
        assert lower.replaced == 0 and "gc_deletes" in lower.refused["k3"]
        assert "k3" not in index.all_versions()
    assert index.delete(["k2", "nope"]) == 1
    assert set(index.all_versions()) == ({"k1", "k3"} if backend == "tantivy" else {"k1"})
    index.close()


# --- comparison rules ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 3), st.sampled_from("xy")), max_size=30
    ),
    data=st.data(),
)
def test_latest_rows_keeps_the_greatest_version_and_event_id_first_read(
    payments_spec: DatasourceSpec, events: list[tuple[str, int, str]], data: st.DataObject
) -> None:
    offsets = list(range(len(events)))
    rows = [(k, v, e, o) for (k, v, e), o in zip(events, offsets, strict=True)]
    shuffled = data.draw(st.permutations(rows))
    table = pa.table(
        {
            "txn_id": [r[0] for r in shuffled],
            "version": pa.array([r[1] for r in shuffled], pa.int64()),
            "event_id": [r[2] for r in shuffled],
            SOURCE_OFFSET: pa.array([r[3] for r in shuffled], pa.int64()),
        }
    )
    got = {r["txn_id"]: r for r in latest_rows(payments_spec, table).to_pylist()}
    for key in {r[0] for r in rows}:
        best = max((v, e) for k, v, e, _o in rows if k == key)
        first = min(o for k, v, e, o in rows if k == key and (v, e) == best)
        assert (got[key]["version"], got[key]["event_id"], got[key][SOURCE_OFFSET]) == (
            *best,
            first,
        )
    assert len(got) == len({r[0] for r in rows})


MUTATIONS = {
    "same": set(),
    "missing": {"missing"},
    "older": {"stale"},
    "newer": {"unexpected"},
    "amount": {"corrupt"},
    "twice": {"duplicate"},
}


@settings(max_examples=60, deadline=None)
@given(
    mutations=st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=12),
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_compare_rows_reports_each_kind_once_whatever_the_order(
    payments_spec: DatasourceSpec, mutations: list[str], extra: int, data: st.DataObject
) -> None:
    columns = list(payments_spec.columns)

    def row(key: str, version: int = 2, **changes: Any) -> tuple[Any, ...]:
        values = payment(key, version, **changes)
        return tuple(values[c] for c in columns)

    expected = {f"k{i}": row(f"k{i}") for i in range(len(mutations))}
    found: list[tuple[Any, ...]] = []
    for i, mutation in enumerate(mutations):
        key = f"k{i}"
        found += {
            "same": [expected[key]],
            "missing": [],
            "older": [row(key, 1)],
            "newer": [row(key, 3)],
            "amount": [row(key, amount=1)],
            "twice": [expected[key], expected[key]],
        }[mutation]
    found += [row(f"extra{i}") for i in range(extra)]
    diffs = compare_rows(payments_spec, expected, data.draw(st.permutations(found)))
    kinds: dict[str, set[str]] = {}
    for d in diffs:
        assert d.key is not None and d.kind not in kinds.get(d.key, set())
        kinds.setdefault(d.key, set()).add(d.kind)
    want = {f"k{i}": MUTATIONS[m] for i, m in enumerate(mutations) if MUTATIONS[m]}
    want |= {f"extra{i}": {"unexpected"} for i in range(extra)}
    assert kinds == want
    for d in diffs:
        if d.kind == "corrupt":
            assert d.expected == {"amount": 10_000} and d.found == {"amount": 1}


def test_compare_search_kinds_and_elasticsearch_version_ties() -> None:
    at = T0
    expected = {k: (2, f"{k}-b", at) for k in ("same", "older", "newer", "tie", "gone", "moved")}
    found = {
        "same": (2, "same-b"),
        "older": (1, "older-a"),
        "newer": (3, "newer-c"),
        "tie": (2, "tie-a"),  # equal version, the other event of the tie
        "moved": (2, "moved-b"),
        "extra": (1, "extra-a"),
    }
    located = {"same": at, "moved": at + timedelta(hours=1), "tie": at}
    kinds = {(d.key, d.kind) for d in compare_search(expected, found, located, event_ids=True)}
    assert kinds == {
        ("older", "stale"),
        ("newer", "unexpected"),
        ("tie", "stale"),
        ("gone", "missing"),
        ("moved", "corrupt"),
        ("extra", "unexpected"),
    }
    ties_ok = {(d.key, d.kind) for d in compare_search(expected, found, located, event_ids=False)}
    assert ties_ok == kinds - {("tie", "stale")}

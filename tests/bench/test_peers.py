"""``bench/peers.py`` on a tiny stream: its reference is right, and so is its verdict.

Speeds are the benchmark's business (run it); here only what its table claims:
the pyarrow reference equals an independent DuckDB recount from the raw events,
Tally's and DuckDB's rollups equal it, and chDB's ``FINAL`` rows do while its
``SummingMergeTree`` rollup is reported off by a nonzero amount.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from bench.common import Figures, Log
from bench.peers import (
    ENGINES,
    METRICS,
    TINY,
    Outcome,
    Reference,
    canonical_hourly,
    main,
    run_all,
    side_by_side,
)

Run = tuple[Figures, Reference, dict[str, Outcome]]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run_all(TINY, tmp_path_factory.mktemp("peers"), Log())


def test_the_stream_has_duplicates_reordered_versions_and_old_cancellations(ran: Run) -> None:
    _, ref, _ = ran
    events = ref.events
    assert pc.count_distinct(events.column("event_id")).as_py() < events.num_rows  # redelivered
    canceled = events.filter(pc.greater(events.column("version"), 1))
    assert canceled.num_rows > 0
    age = pc.subtract(canceled.column("occurred_at"), canceled.column("approved_at"))
    oldest = timedelta(microseconds=pc.max(pc.cast(age, pa.int64())).as_py())
    assert timedelta(days=28) < oldest <= timedelta(days=91)  # beyond the generator's delays
    # Some key's later version arrives in an earlier position than an earlier version.
    rows = pa.table(
        {
            "txn_id": events.column("txn_id"),
            "version": events.column("version"),
            "pos": pa.array(range(events.num_rows)),
        }
    )
    con = duckdb.connect()
    con.register("first", rows.group_by(["txn_id", "version"]).aggregate([("pos", "min")]))
    [(reordered,)] = con.execute(
        "SELECT count(*) FROM first a JOIN first b ON a.txn_id = b.txn_id "
        "AND a.version < b.version AND a.pos_min > b.pos_min"
    ).fetchall()
    assert reordered > 0


def test_the_reference_equals_an_independent_duckdb_recount(ran: Run) -> None:
    _, ref, _ = ran
    events = ref.events
    con = duckdb.connect()
    con.register("events", events)
    con.execute(
        "CREATE VIEW latest AS SELECT * FROM events QUALIFY row_number() OVER "
        "(PARTITION BY txn_id ORDER BY version DESC, event_id DESC) = 1"
    )
    relation = con.sql(
        "SELECT time_bucket(INTERVAL 1 HOUR, approved_at, 'Asia/Seoul') AS hour, "
        "merchant_id, method, status, currency, count(*) AS count, "
        "sum(amount) AS gross_amount, sum(canceled_amount) AS canceled_amount "
        "FROM latest GROUP BY ALL"
    )
    assert relation is not None
    assert canonical_hourly(relation.to_arrow_table()).equals(ref.hourly)
    assert ref.latest.num_rows == pc.count_distinct(events.column("txn_id")).as_py()
    assert con.execute("SELECT count(*) FROM latest").fetchall() == [(ref.latest.num_rows,)]
    states = ref.latest.group_by("status").aggregate([("txn_id", "count")]).to_pylist()
    assert {s["status"] for s in states} == {"DONE", "PARTIAL_CANCELED", "CANCELED"}


@pytest.mark.parametrize("engine", ["tally", "duckdb"])
def test_exact_engines_match_the_reference(ran: Run, engine: str) -> None:
    figures, _, outcomes = ran
    assert outcomes[engine].off == dict.fromkeys([*METRICS, "net_amount"], 0)
    for name in ("base_exact", "rollup_exact", "sales_exact"):
        assert figures.value(f"{name}_{engine}") == 1.0, name
    assert figures.value(f"rollup_count_off_{engine}") == 0


def test_chdb_final_rows_are_right_and_its_summing_rollup_is_reported_off(ran: Run) -> None:
    pytest.importorskip("chdb")
    figures, _, outcomes = ran
    assert figures.value("base_exact_chdb") == 1.0  # ReplacingMergeTree ... FINAL
    off = outcomes["chdb"].off
    assert off["count"] > 0 and off["gross_amount"] > 0 and off["net_amount"] > 0
    assert figures.value("rollup_exact_chdb") == 0.0
    assert figures.value("rollup_count_off_chdb") == off["count"]


def test_the_table_puts_engines_side_by_side_with_yes_and_no(ran: Run) -> None:
    figures, _, _ = ran
    lines = side_by_side(figures, ENGINES, "t").splitlines()
    assert lines[1].split() == ["figure", *ENGINES, "unit"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows["rollup_exact"][:2] == ["yes", "yes"]
    assert rows["base_exact"][-1] == "yes/no"


def test_huge_is_refused_with_a_pointer_to_the_key_index_bench(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"bench/keyindex\.py covers 100M keys"):
        main(["--scale", "huge", "--data-dir", str(tmp_path)])

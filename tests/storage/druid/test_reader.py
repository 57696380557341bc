"""DruidReader on a real Druid 33: merged on read whatever Druid holds, typed as the
spec says, tenant-scoped lookups, Seoul-day partitions, and errors translated.

Rows are loaded with native batch tasks (``loading.load``) in several tasks, so that
one key's versions, duplicates and ties sit in different segments, as the supervisor
leaves them; the Kafka path is ``test_e2e``.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlglot import exp

from storage.druid.reader import DruidReader
from storage.sql import subquery
from tally.errors import DruidUnavailable, QueryError
from tally.settings import DruidSettings, Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.druid import Druid
from tests.factories import T0, latest_by_key, payment
from tests.storage.druid.loading import load

pytestmark = pytest.mark.slow


def _all(
    reader: DruidReader, start: datetime | None = None, end: datetime | None = None
) -> list[dict[str, Any]]:
    rel = reader.relation("payments", start, end)
    sql = (
        exp.select(exp.Star())
        .from_(subquery(rel, "m"))
        .sql(dialect=reader.capabilities.sql_dialect)
    )
    rows: list[dict[str, Any]] = reader.arrow(sql).to_pylist()
    return rows


def test_merged_on_read_is_the_latest_version_and_event_id_per_key(
    druid: Druid, dsettings: Settings, dreader: DruidReader, payments_spec: DatasourceSpec
) -> None:
    day = timedelta(days=1)
    newer = [
        payment("a", 2, canceled_amount=10_000),  # canceled
        payment("b", 1, merchant_id="m2", approved_at=T0 + 3 * day),
        payment("c", 3, canceled_amount=4_000, event_id="c-3-b"),  # tie on version 3 …
        payment("d", 1, approved_at=T0 + 30 * day),
    ]
    older = [
        payment("a", 1),  # an older version arriving after the newer one
        payment("a", 2, canceled_amount=10_000),  # a duplicate of the newest
        payment("c", 3, canceled_amount=2_000, event_id="c-3-a"),  # … lower event_id
        payment("c", 2, canceled_amount=1_000),
        payment("d", 2, canceled_amount=500, approved_at=T0 + 30 * day),  # late cancel, 30 days on
    ]
    load(druid, dsettings, payments_spec, newer)
    load(druid, dsettings, payments_spec, older)

    want = latest_by_key(payments_spec, newer + older)
    got = {r["txn_id"]: r for r in _all(dreader)}
    assert set(got) == set(want)
    for key, row in want.items():
        assert got[key] == dict(row), key  # every column, named and typed as the spec
    assert got["c"]["event_id"] == "c-3-b" and got["d"]["status"] == "PARTIAL_CANCELED"
    assert list(got["a"]) == list(payments_spec.columns)

    # The range reads only its intervals; each key's versions share the partition time.
    first_days = _all(dreader, T0, T0 + 5 * day)
    assert {r["txn_id"] for r in first_days} == {"a", "b", "c"}

    # Lookups: merged, tenant-scoped (another merchant's key is simply absent).
    found = dreader.lookup("payments", ["a", "b", "zz"], tenant="m1").to_pylist()
    assert [r["txn_id"] for r in found] == ["a"] and found[0]["version"] == 2
    assert dreader.lookup("payments", ["b"], tenant="m1").num_rows == 0
    assert dreader.lookup("payments", ["b"], tenant="m2").num_rows == 1
    # Partitions from the index (Seoul days) narrow the intervals read.
    tz = payments_spec.tz
    d_day = (T0 + 30 * day).astimezone(tz).strftime("%Y-%m-%d")
    assert dreader.lookup("payments", ["d"], partitions=[d_day]).num_rows == 1
    assert dreader.lookup("payments", ["d"], partitions=["2026-01-01"]).num_rows == 0

    # Partitions are the spec's calendar days (Seoul), not Druid's UTC chunks.
    assert dreader.partition_groups("payments") == [["2026-01-01"], ["2026-01-04"], [d_day]]
    assert dreader.partition_groups("payments", T0 + 2 * day, T0 + 10 * day) == [["2026-01-04"]]
    assert dreader.freshness("payments") == T0 + 30 * day
    figures = dreader.ingest_figures("payments")
    assert figures.datasets["payments"][1] == len(newer) + len(older)  # rows as stored


def test_a_datasource_druid_does_not_serve_yet_is_empty(
    dreader: DruidReader, payments_spec: DatasourceSpec
) -> None:
    assert _all(dreader) == []
    assert dreader.lookup("payments", ["a"], tenant="m1").num_rows == 0
    assert dreader.partition_groups("payments") == []
    assert dreader.freshness("payments") is None


def test_parameters_are_bound_by_druid(druid: Druid, dsettings: Settings, dreader: DruidReader,
                                       payments_spec: DatasourceSpec) -> None:  # fmt: skip
    name = load(druid, dsettings, payments_spec, [payment("p1"), payment("p2", merchant_id="m2")])
    sql = f'SELECT txn_id FROM "{name}" WHERE merchant_id = ? AND __time >= ?'
    assert dreader.query(sql, ["m1", T0 - timedelta(hours=1)]).rows == [["p1"]]
    assert dreader.query(sql, ["m1' OR '1'='1", T0]).rows == []  # text, never SQL


def test_errors_are_translated_at_the_boundary(
    dsettings: Settings, dreader: DruidReader, registry: SpecRegistry
) -> None:
    with pytest.raises(QueryError, match="refused"):
        dreader.query("SELECT no_such_column FROM INFORMATION_SCHEMA.TABLES")
    with pytest.raises(QueryError):
        dreader.query("SELECT ? + 1")  # a parameter left unbound
    with pytest.raises(QueryError, match="rollup"):
        dreader.lookup("payments_hourly", ["a"])  # a rollup has no rows by key
    with pytest.raises(QueryError):
        dreader.rollup_state("payments_hourly")

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = DruidReader(
        dsettings.model_copy(update={"druid": DruidSettings(broker_url=closed)}), registry
    )
    with pytest.raises(DruidUnavailable, match="unreachable") as info:
        down.query("SELECT 1")
    assert info.value.transient
    with pytest.raises(DruidUnavailable):
        down.lookup("payments", ["a"])
    with pytest.raises(DruidUnavailable, match="broker_url is not set"):
        DruidReader(dsettings.model_copy(update={"druid": DruidSettings()}), registry)


def test_a_query_past_its_timeout_is_cut_by_druid(
    druid: Druid, dsettings: Settings, dreader: DruidReader, payments_spec: DatasourceSpec
) -> None:
    """Druid's own timeout (the query context) cuts the query: transient, the API's 503."""
    load(druid, dsettings, payments_spec, [payment(f"s{i}") for i in range(50)])
    rel = dreader.relation("payments")
    sql = exp.select(exp.Count(this=exp.Star())).from_(subquery(rel, "m"))
    text = sql.sql(dialect=dreader.capabilities.sql_dialect)
    assert dreader.query(text, timeout_s=30).rows == [[50]]
    started = datetime.now(UTC)
    with pytest.raises(DruidUnavailable, match=r"timed out|timeout"):
        dreader.query(text, timeout_s=0.001)
    assert (datetime.now(UTC) - started).total_seconds() < 5

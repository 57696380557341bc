"""Druid SQL rendering and the broker's typed parameters and results: pure, no Druid."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlglot import exp

from storage.druid import dialect
from storage.druid.broker import parameter, to_arrow
from storage.druid.sqlgen import merged
from storage.sql import bucket_expr, col, timestamp
from tally.errors import QueryError
from tally.specs import DatasourceSpec

KST = timezone(timedelta(hours=9))


@pytest.mark.parametrize(
    ("granularity", "druid", "duckdb"),
    [
        ("hour", "TIME_FLOOR(\"t\", 'PT1H', NULL, 'Asia/Seoul')", "DATE_TRUNC('HOUR', "),
        ("day", "TIME_FLOOR(\"t\", 'P1D', NULL, 'Asia/Seoul')", "DATE_TRUNC('DAY', "),
        ("month", "TIME_FLOOR(\"t\", 'P1M', NULL, 'Asia/Seoul')", "DATE_TRUNC('MONTH', "),
    ],
)
def test_bucket_expr_renders_in_each_dialect(granularity: str, druid: str, duckdb: str) -> None:
    tree = bucket_expr(col("t"), granularity, "Asia/Seoul")
    assert tree.sql(dialect=dialect.NAME) == druid
    assert tree.sql(dialect="duckdb") == (
        f"{duckdb}\"t\" AT TIME ZONE 'Asia/Seoul') AT TIME ZONE 'Asia/Seoul'"
    )
    assert tree.sql(dialect="postgres") == tree.sql(dialect="duckdb")


@pytest.mark.parametrize(
    ("zone", "granularity", "at", "bucket"),
    [
        ("Asia/Seoul", "day", "2026-01-01 15:30:00+00", "2026-01-01 15:00:00+00"),
        ("Asia/Seoul", "month", "2026-01-31 15:30:00+00", "2026-01-31 15:00:00+00"),
        ("Asia/Kolkata", "hour", "2026-01-01 10:10:00+00", "2026-01-01 09:30:00+00"),
    ],
)
def test_bucket_expr_in_duckdb_is_the_zoned_calendar_bucket(
    zone: str, granularity: str, at: str, bucket: str
) -> None:
    import duckdb

    instant = exp.cast(exp.Literal.string(at), "TIMESTAMPTZ")
    tree = bucket_expr(instant, granularity, zone)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    row = con.execute(f"SELECT {tree.sql(dialect='duckdb')} = CAST('{bucket}' AS TIMESTAMPTZ)")
    assert row.fetchone() == (True,)


def test_druid_refuses_other_at_time_zone() -> None:
    import sqlglot

    tree = exp.AtTimeZone(this=col("t"), zone=exp.Literal.string("UTC"))
    with pytest.raises(sqlglot.errors.UnsupportedError):
        tree.sql(dialect=dialect.NAME, unsupported_level=sqlglot.ErrorLevel.RAISE)


def test_instants_and_string_functions_render_as_druid_runs_them() -> None:
    at = datetime(2026, 1, 1, tzinfo=KST)
    assert timestamp(at).sql(dialect=dialect.NAME) == "TIME_PARSE('2026-01-01T00:00:00+09:00')"
    pos = exp.StrPosition(this=exp.Lower(this=col("a")), substr=exp.Literal.string("x"))
    assert pos.sql(dialect=dialect.NAME) == "STRPOS(LOWER(\"a\"), 'x')"
    with pytest.raises(ValueError, match="no Druid period"):
        dialect.period("fortnight")


def test_merged_relation_ranks_by_version_then_event_id(payments_spec: DatasourceSpec) -> None:
    sql = merged(payments_spec, "ns_payments", datetime(2026, 1, 1, tzinfo=UTC)).sql(
        dialect=dialect.NAME
    )
    assert (
        'ROW_NUMBER() OVER (PARTITION BY "merchant_id", "txn_id" ORDER BY "version" DESC,'
        ' "event_id" DESC)' in sql
    )
    assert "\"__time\" >= TIME_PARSE('2026-01-01T00:00:00+00:00')" in sql
    assert '"__time" AS "approved_at"' in sql
    assert 'MILLIS_TO_TIMESTAMP("occurred_at") AS "occurred_at"' in sql
    assert 'FROM "ns_payments"' in sql and '"__tally_rank" = 1' in sql


def test_parameters_are_typed_and_never_text() -> None:
    assert parameter("x'; DROP") == {"type": "VARCHAR", "value": "x'; DROP"}
    assert parameter(3) == {"type": "BIGINT", "value": 3}
    assert parameter(True) == {"type": "BOOLEAN", "value": True}
    assert parameter(datetime(1970, 1, 1, 9, tzinfo=KST)) == {"type": "TIMESTAMP", "value": 0}
    with pytest.raises(QueryError):
        parameter(datetime(2026, 1, 1))  # naive: which zone?
    with pytest.raises(QueryError):
        parameter(object())


def test_results_are_typed_by_the_sql_types_header() -> None:
    table = to_arrow(
        ["t", "n", "s"],
        ["TIMESTAMP", "BIGINT", "VARCHAR"],
        [["2026-01-01T00:00:00.000Z", 1, "a"], [None, None, None]],
    )
    assert table.column("t").to_pylist()[0] == datetime(2026, 1, 1, tzinfo=UTC)
    assert str(table.schema.field("t").type) == "timestamp[us, tz=UTC]"
    assert table.column("n").to_pylist() == [1, None]


def test_a_spec_druid_echoes_in_its_own_forms_is_unchanged() -> None:
    """What Druid 33 returns for a submitted spec (measured): durations in seconds, a
    granularity as an object, no ioConfig type, defaults added — still the same spec."""
    from storage.druid.supervisor import contains

    wanted = {"io": {"type": "kafka", "taskDuration": "PT1H", "n": 1}, "g": "NONE", "d": [{"a": 1}]}
    echoed = {"io": {"taskDuration": "PT3600S", "n": 1, "x": 2}, "g": {"type": "none"},
              "d": [{"a": 1, "b": 0}]}  # fmt: skip
    assert contains(echoed, wanted)
    assert not contains(echoed | {"g": {"type": "hour"}}, wanted)
    assert not contains({**echoed, "io": {"taskDuration": "PT1800S", "n": 1}}, wanted)
    assert not contains({**echoed, "io": {"taskDuration": "PT3600S", "n": 2}}, wanted)


def test_other_dialects_group_by_all_and_null_order_become_druid_sql() -> None:
    import sqlglot

    sql = "SELECT status, count(*) AS n FROM payments GROUP BY ALL ORDER BY status"
    assert sqlglot.transpile(sql, read="duckdb", write=dialect.NAME)[0] == (
        'SELECT "status", COUNT(*) AS "n" FROM "payments" GROUP BY 1'
        ' ORDER BY CASE WHEN "status" IS NULL THEN 1 ELSE 0 END, "status"'
    )

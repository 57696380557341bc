"""``tallystarrocks``: the zoned trees Tally builds, rendered as StarRocks runs them
(pure: no engine)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlglot
from sqlglot import exp

from storage.sql import bucket_expr, col, timestamp
from storage.starrocks import dialect
from storage.starrocks.connection import bind
from tally.errors import QueryError


def test_a_zoned_truncation_converts_to_the_zone_and_back() -> None:
    """sqlglot's own starrocks drops the zone (a Seoul day would be cut in UTC)."""
    tree = bucket_expr(col("approved_at"), "day", "Asia/Seoul")
    assert "Asia/Seoul" not in tree.sql("starrocks")  # the loss this dialect repairs
    assert tree.sql(dialect.NAME) == (
        "CONVERT_TZ(DATE_TRUNC('day', CONVERT_TZ(`approved_at`, 'UTC', 'Asia/Seoul')),"
        " 'Asia/Seoul', 'UTC')"
    )


def test_a_zoned_literal_is_its_utc_datetime() -> None:
    seoul = timezone(timedelta(hours=9))
    tree = timestamp(datetime(2026, 1, 1, tzinfo=seoul))
    assert tree.sql(dialect.NAME) == "CAST('2025-12-31 15:00:00.000000' AS DATETIME)"


def test_any_other_at_time_zone_is_refused() -> None:
    node = exp.AtTimeZone(this=col("t"), zone=exp.Literal.string("Asia/Seoul"))
    with pytest.raises(sqlglot.errors.UnsupportedError):
        node.sql(dialect.NAME, unsupported_level=sqlglot.ErrorLevel.RAISE)


def test_placeholders_are_bound_as_quoted_literals_in_the_tree() -> None:
    sql = "SELECT * FROM t WHERE a = ? AND b LIKE ? AND c >= ?"
    bound = bind(sql, ["x' OR '1'='1", "50%", datetime(2026, 1, 1, tzinfo=UTC)])
    assert bound == (
        "SELECT * FROM t WHERE a = 'x'' OR ''1''=''1' AND b LIKE '50%'"
        " AND c >= CAST('2026-01-01 00:00:00.000000' AS DATETIME)"
    )
    with pytest.raises(QueryError):
        bind("SELECT ?", [1, 2])

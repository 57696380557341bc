"""SQL to StarRocks over the MySQL protocol (pymysql, the FE's query port), errors
translated where the driver raises them.

StarRocks' DATETIME has no zone: Tally stores instants as UTC, so every naive
datetime read back is marked UTC here, and every one sent is converted to UTC first.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pymysql
import pymysql.cursors
import sqlglot
from sqlglot import exp

from tally.errors import QueryError, StoreError, StoreUnavailable, TallyError
from tally.settings import StarRocksSettings

# MySQL client and server error numbers that pass by themselves: can't connect, lost
# connection, server gone away, lock wait timeout, too many connections.
_TRANSIENT = {2002, 2003, 2006, 2013, 2055, 1040, 1205, 1213}


class Connection:
    """One pymysql connection per thread, opened lazily, reopened after a failure."""

    def __init__(self, settings: StarRocksSettings, *, database: bool = True) -> None:
        self.settings = settings
        self._database = database
        self._local = threading.local()

    def _conn(self) -> pymysql.connections.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            sr = self.settings
            try:
                conn = pymysql.connect(
                    host=sr.host,
                    port=sr.query_port,
                    user=sr.user,
                    password=sr.password.get_secret_value() if sr.password else "",
                    database=sr.database if self._database else None,
                    connect_timeout=min(10.0, sr.request_timeout_s),
                    read_timeout=sr.request_timeout_s,
                    write_timeout=sr.request_timeout_s,
                    autocommit=True,
                    charset="utf8mb4",
                )
            except pymysql.MySQLError as exc:
                raise _translate(
                    exc, f"connecting to StarRocks at {sr.host}:{sr.query_port}"
                ) from exc
            self._local.conn = conn
        return conn

    def execute(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one statement; its column names and rows (naive datetimes as UTC)."""
        conn = self._conn()
        text = bind(sql, params) if params else sql
        try:
            with conn.cursor() as cur:
                cur.execute(text)
                names = [d[0] for d in cur.description or ()]
                rows = [tuple(_value(v) for v in row) for row in cur.fetchall()]
        except pymysql.MySQLError as exc:
            self.close()
            raise _translate(exc, "StarRocks") from exc
        return names, rows

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        names, rows = self.execute(sql, params)
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        return pa.table(
            {n: pa.array(list(c)) for n, c in zip(_unique(names), columns, strict=True)}
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(pymysql.MySQLError):
                conn.close()


def _translate(exc: pymysql.MySQLError, what: str) -> TallyError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    text = exc.args[1] if len(exc.args) > 1 else str(exc)
    if code in _TRANSIENT or (isinstance(exc, pymysql.OperationalError) and code is None):
        return StoreUnavailable(f"{what}: {text}")
    if isinstance(exc, pymysql.ProgrammingError | pymysql.DataError):
        return QueryError(f"{what}: {text}")
    return StoreError(f"{what}: {text}")


def bind(sql: str, params: Sequence[Any]) -> str:
    """``?`` placeholders (what Tally's trees render) bound as literals in the tree,
    quoted by sqlglot: pymysql's own binding wants ``%s`` and would read a ``%`` in
    the statement as one."""
    values = iter(params)

    def literal(node: exp.Expr) -> exp.Expr:
        if not isinstance(node, exp.Placeholder):
            return node
        try:
            return _literal(next(values))
        except StopIteration:
            raise QueryError("more placeholders than parameters") from None

    tree = sqlglot.parse_one(sql, read="starrocks").transform(literal)
    if next(values, _END) is not _END:
        raise QueryError("more parameters than placeholders")
    return tree.sql("starrocks")


_END = object()


def _literal(value: Any) -> exp.Expr:
    if value is None:
        return exp.null()
    if isinstance(value, bool):
        return exp.true() if value else exp.false()
    if isinstance(value, int | float):
        return exp.Literal.number(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise QueryError("a time sent to StarRocks must be timezone-aware")
        text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return exp.cast(exp.Literal.string(text), "DATETIME")
    return exp.Literal.string(str(value))


def _value(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out

"""Merchant SQL made safe: parse, check against allowlists, scope, transpile.

The rules are allowlists, never blocklists, because the engine's surface (DuckDB's
hundreds of functions, table functions, pragmas) grows with every release:

* exactly one statement, and it is a query (SELECT, possibly with CTEs and set
  operations) — no COPY, ATTACH, PRAGMA, SET, INSTALL, LOAD or anything else;
* every table is a known datasource or rollup, unqualified (no schema, catalog or
  file), or a CTE of the query whose name shadows no datasource; table functions
  (``read_parquet``, ``glob``, ``duckdb_tables`` ...) are not tables;
* every function is one of a fixed set of scalar and aggregate functions (by sqlglot's
  dialect-neutral class, so ``DATE_FORMAT`` from MySQL and ``strftime`` from DuckDB are
  the same thing), and unknown (``Anonymous``) functions must be on a short list;
* every reference to a datasource is replaced by a subquery that keeps only the key's
  merchant — in CTEs, subqueries, joins and unions alike, since the rewrite walks the
  whole tree — so no rewrite of the query can see another merchant's row.

The result is rendered for the engine's dialect with a row limit around it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

from tally.errors import InvalidArgument

DIALECTS = ("mysql", "starrocks", "postgres", "duckdb", "trino", "bigquery", "snowflake")

_FUNCTIONS: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name)
    for name in (
        # aggregates
        "Count",
        "Sum",
        "Avg",
        "Min",
        "Max",
        "ApproxDistinct",
        "CountIf",
        "Stddev",
        "StddevPop",
        "StddevSamp",
        "Variance",
        "VariancePop",
        "Median",
        "Quantile",
        "ApproxQuantile",
        "ArgMax",
        "ArgMin",
        "AnyValue",
        "LogicalAnd",
        "LogicalOr",
        # logic (sqlglot models these connectives as functions)
        "And",
        "Or",
        "Xor",
        "Not",
        "RegexpILike",
        "Case",
        "Collate",
        # scalar
        "Coalesce",
        "Nullif",
        "If",
        "Greatest",
        "Least",
        "Cast",
        "TryCast",
        "Abs",
        "Round",
        "Floor",
        "Ceil",
        "Mod",
        "Sign",
        "Sqrt",
        "Pow",
        "Ln",
        "Log",
        "Exp",
        "Lower",
        "Upper",
        "Length",
        "Substring",
        "Concat",
        "ConcatWs",
        "Trim",
        "Left",
        "Right",
        "StrPosition",
        "Lpad",
        "Rpad",
        "Initcap",
        "Reverse",
        "RegexpLike",
        "StartsWith",
        "Replace",
        # time
        "DateTrunc",
        "TimestampTrunc",
        "TimeToStr",
        "StrToTime",
        "StrToDate",
        "Extract",
        "Date",
        "Year",
        "Quarter",
        "Month",
        "Week",
        "Day",
        "DayOfWeek",
        "DayOfMonth",
        "DayOfYear",
        "Hour",
        "Minute",
        "Second",
        "DateAdd",
        "DateSub",
        "DateDiff",
        "TimestampAdd",
        "TimestampSub",
        "TimestampDiff",
        "TsOrDsAdd",
        "TsOrDsToDate",
        "TsOrDsToTimestamp",
        "TimeStrToTime",
        "AtTimeZone",
        "ConvertTimezone",
        "CurrentDate",
        "CurrentTimestamp",
        "UnixToTime",
        "TimeToUnix",
        # window helpers
        "RowNumber",
        "Rank",
        "DenseRank",
        "Lag",
        "Lead",
        "FirstValue",
        "LastValue",
        "NthValue",
        "PercentRank",
        "CumeDist",
        "Ntile",
    )
    if hasattr(exp, name)
)
_ANONYMOUS = frozenset({"date_part", "datepart", "timezone", "epoch", "epoch_ms", "strftime"})
# Node types that have no business in a read-only query however they got there.
_FORBIDDEN = (
    exp.Command, exp.Copy, exp.Pragma, exp.Set, exp.Insert, exp.Update, exp.Delete,
    exp.Create, exp.Drop, exp.Alter, exp.Merge, exp.Use, exp.Describe, exp.Placeholder,
    exp.Into, exp.Lock,
)  # fmt: skip


@dataclass(frozen=True)
class Scoped:
    sql: str  # for the engine
    tables: tuple[str, ...]  # datasources the query reads
    # Values of the ``?`` placeholders in ``sql``, in order: the tenant, wherever it
    # was injected, bound by the engine (a merchant's SQL may contain no placeholder).
    params: tuple[str, ...] = ()


def _named(name: str) -> exp.Expression:
    return exp.Table(this=exp.to_identifier(name, quoted=True))


def scope(
    sql: str,
    dialect: str,
    *,
    tenant_columns: Mapping[str, str],
    tenant: str,
    engine_dialect: str,
    row_limit: int,
    source: Callable[[str], exp.Expression] = _named,
    joins: bool = True,
) -> Scoped:
    """The merchant's query, checked and rewritten; raises InvalidArgument with one
    line naming the first problem. ``tenant_columns`` names every datasource and
    rollup the query may read, with its tenant column: each reference is narrowed by
    its own, so both sides of a join hold only the key's merchant. ``source(name)``
    is what a datasource's reference reads before the tenant filter: the engine's
    view of that name by default, or a relation (a subquery) on engines whose names
    are not merged views. Without ``joins`` the engine cannot join and a JOIN is
    refused (subqueries in a predicate still work)."""
    if dialect not in DIALECTS:
        raise InvalidArgument(f"dialect must be one of {', '.join(DIALECTS)}")
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except (ParseError, SqlglotError) as exc:
        raise InvalidArgument(f"cannot parse the SQL: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise InvalidArgument("exactly one statement, please (no ';'-separated batches)")
    root = statements[0]
    if not isinstance(root, exp.Query):
        raise InvalidArgument(f"only queries are allowed, not {root.key.upper()}")
    ctes = _cte_names(root)
    clash = ctes & set(tenant_columns)
    if clash:
        raise InvalidArgument(f"a CTE may not be named like a datasource: {sorted(clash)[0]}")
    read: set[str] = set()
    for node in root.walk():
        _check(node, tenant_columns, ctes, read)
        if not joins and isinstance(node, exp.Join):
            raise InvalidArgument(
                "this engine does not join datasources; ask each alone, or use /v1/ledger"
            )
    scoped = root.transform(lambda node: _scoped_table(node, tenant_columns, source), copy=True)
    limited = (
        exp.select(exp.Star())
        .from_(exp.Subquery(this=scoped, alias=exp.TableAlias(this=exp.to_identifier("q"))))
        .limit(row_limit + 1)
    )
    try:
        out = limited.sql(dialect=engine_dialect, unsupported_level=sqlglot.ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise InvalidArgument(f"cannot translate the SQL: {_first_line(exc)}") from exc
    # Every placeholder is a tenant filter of ours: the merchant's own are refused.
    bound = tuple(tenant for _ in limited.find_all(exp.Placeholder))
    return Scoped(out, tuple(sorted(read)), bound)


def _check(node: Any, tables: Collection[str], ctes: set[str], read: set[str]) -> None:
    if isinstance(node, _FORBIDDEN):
        raise InvalidArgument(f"{node.key.upper()} is not allowed in a query")
    if isinstance(node, exp.Table):
        if not isinstance(node.this, exp.Identifier):
            raise InvalidArgument("only datasources can be read, not table functions or files")
        if node.args.get("db") or node.args.get("catalog"):
            raise InvalidArgument(f"{node.sql()}: datasources are named without a schema")
        name = node.name
        if name in ctes:
            return
        if name not in tables:
            raise InvalidArgument(
                f"unknown datasource {name!r}; known: {', '.join(sorted(tables))}"
            )
        read.add(name)
        return
    if isinstance(node, exp.Anonymous):
        if str(node.name).lower() not in _ANONYMOUS:
            raise InvalidArgument(f"function {node.name}() is not allowed")
        return
    if isinstance(node, exp.Func) and not isinstance(node, _FUNCTIONS):
        raise InvalidArgument(f"function {node.sql_name()}() is not allowed")


def _cte_names(root: Any) -> set[str]:
    return {cte.alias_or_name for cte in root.find_all(exp.CTE)}


def _scoped_table(
    node: exp.Expression,
    tenant_columns: Mapping[str, str],
    source: Callable[[str], exp.Expression],
) -> exp.Expression:
    if not isinstance(node, exp.Table) or node.name not in tenant_columns:
        return node
    tenant_column = tenant_columns[node.name]
    alias = node.alias or node.name
    relation = source(node.name)
    if not isinstance(relation, exp.Table):
        relation = exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier("d")))
    inner = (
        exp.select(exp.Star())
        .from_(relation)
        .where(exp.EQ(this=exp.column(tenant_column, quoted=True), expression=exp.Placeholder()))
    )
    return exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier(alias)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__

"""The time range a query reads of a table, from its SQL tree (a pure function).

Why: when one partition of a datasource is damaged, a query that does not read that
partition's time range must keep working, and one that does must fail rather than
answer without it. The range is taken from what the query itself says, conservatively:
every reference to the table must sit in a SELECT whose WHERE clause, at its top-level
AND, compares the time column with literal instants. Anything else (no WHERE, an OR,
a filter applied outside a subquery or CTE, a non-literal bound) counts as unbounded,
so a query is never let through on a guess.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlglot
from sqlglot import exp

Interval = tuple[datetime | None, datetime | None]  # [start, end); None: unbounded


def read_range(sql: str | exp.Expression, table: str, column: str, dialect: str) -> Interval | None:
    """The smallest [start, end) holding every row of ``table`` the query reads, as
    bounds on ``column``; None when the query does not name the table. A bound that
    cannot be read off the query is None (unbounded on that side)."""
    tree = sqlglot.parse_one(sql, dialect=dialect) if isinstance(sql, str) else sql
    spans: list[Interval] = []
    for ref in tree.find_all(exp.Table):
        if ref.name.lower() != table.lower() or isinstance(ref.this, exp.Anonymous):
            continue
        aliases = {table.lower(), (ref.alias or "").lower()} - {""}
        spans.append(_span(ref.find_ancestor(exp.Select), column, aliases))
    if not spans:
        return None
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    start = None if None in starts else min(s for s in starts if s is not None)
    end = None if None in ends else max(e for e in ends if e is not None)
    return start, end


def _span(select: exp.Select | None, column: str, aliases: set[str]) -> Interval:
    """Bounds from the WHERE of ``select`` and, while it only filters (``SELECT *`` with
    no grouping, limit or distinct) and is read as a subquery in a FROM or JOIN, from
    the WHERE of the query reading it (by the subquery's alias): the API's tenant
    scoping wraps every datasource reference this way."""
    span: Interval = (None, None)
    while select is not None:
        where = select.args.get("where")
        if where is not None:
            span = _intersect(span, _bounds(where.this, column, aliases))
        wrapper = select.parent
        if not (
            _transparent(select)
            and isinstance(wrapper, exp.Subquery)
            and isinstance(wrapper.parent, exp.From | exp.Join)
        ):
            break
        aliases = {wrapper.alias.lower()} if wrapper.alias else set()
        select = wrapper.find_ancestor(exp.Select)
    return span


def _transparent(select: exp.Select) -> bool:
    keys = ("group", "having", "limit", "offset", "distinct", "qualify", "windows")
    return all(isinstance(e, exp.Star) for e in select.expressions) and not any(
        select.args.get(k) for k in keys
    )


def _intersect(a: Interval, b: Interval) -> Interval:
    lo = a[0] if b[0] is None else b[0] if a[0] is None else max(a[0], b[0])
    hi = a[1] if b[1] is None else b[1] if a[1] is None else min(a[1], b[1])
    return lo, hi


def overlaps(span: Interval, start: datetime, end: datetime) -> bool:
    lo, hi = span
    return (lo is None or lo < end) and (hi is None or hi > start)


def _bounds(condition: exp.Expression, column: str, aliases: set[str]) -> Interval:
    lo: datetime | None = None
    hi: datetime | None = None
    terms = list(condition.flatten()) if isinstance(condition, exp.And) else [condition]
    for term in terms:
        assert isinstance(term, exp.Expression)
        for kind, instant in _terms(term, column, aliases):
            if kind == "lo":
                lo = instant if lo is None else max(lo, instant)
            else:
                hi = instant if hi is None else min(hi, instant)
    return lo, hi


def _terms(term: exp.Expression, column: str, aliases: set[str]) -> list[tuple[str, datetime]]:
    """("lo", t): rows have time ≥ t; ("hi", t): rows have time < t (an upper bound
    that includes t is widened by a microsecond)."""
    unnested = term.unnest()
    assert isinstance(unnested, exp.Expression)
    term = unnested
    if isinstance(term, exp.Between) and _is_column(term.this, column, aliases):
        low, high = _instant(term.args.get("low")), _instant(term.args.get("high"))
        out = [("lo", low)] if low else []
        return out + ([("hi", _after(high))] if high else [])
    if not isinstance(term, exp.GT | exp.GTE | exp.LT | exp.LTE | exp.EQ):
        return []
    left, right = term.this, term.expression
    flipped = not _is_column(left, column, aliases)
    if flipped:
        left, right = right, left
    if not _is_column(left, column, aliases):
        return []
    instant = _instant(right)
    if instant is None:
        return []
    op: type[exp.Expression] = type(term)
    if flipped:
        mirror: dict[type[exp.Expression], type[exp.Expression]] = {
            exp.GT: exp.LT,
            exp.LT: exp.GT,
            exp.GTE: exp.LTE,
            exp.LTE: exp.GTE,
        }
        op = mirror.get(op, op)
    if op is exp.EQ:
        return [("lo", instant), ("hi", _after(instant))]
    if op in (exp.GT, exp.GTE):
        return [("lo", instant)]
    return [("hi", instant if op is exp.LT else _after(instant))]


def _is_column(node: exp.Expression, column: str, aliases: set[str]) -> bool:
    if not isinstance(node, exp.Column) or node.name.lower() != column.lower():
        return False
    return not node.table or node.table.lower() in aliases


def _instant(node: exp.Expression | None) -> datetime | None:
    """A literal instant: 'text', CAST('text' AS TIMESTAMP…) or TIMESTAMP 'text'; a
    text without an offset is UTC (the readers' session time zone)."""
    while isinstance(node, exp.Cast | exp.TryCast):
        node = node.this
    if isinstance(node, exp.Literal) and node.is_string:
        text = node.this
    elif isinstance(node, exp.TimeStrToTime | exp.TsOrDsToTimestamp) and isinstance(
        node.this, exp.Literal
    ):
        text = node.this.this
    else:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _after(instant: datetime) -> datetime:
    return instant + timedelta(microseconds=1)

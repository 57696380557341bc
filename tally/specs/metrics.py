"""Metric expressions: ``count(*)`` or ``sum(<integer linear expression>)``.

Rollups are maintained by retraction, which is exact only for aggregates that are
invertible: counts and sums of integer expressions. Anything else (min, max, avg,
distinct count) is rejected at spec load. The parsed metric gives both a per-row
Python evaluator (to compute deltas) and a SQL aggregate (to recompute from the base).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "count" | "sum"
    expression: exp.Expression | None  # the summed expression for "sum"
    columns: tuple[str, ...]
    evaluate: Callable[[Mapping[str, Any]], int]
    evaluate_arrow: Callable[[pa.Table], pa.Array]  # per-row contribution, vectorised

    def aggregate_sql(self) -> exp.Expression:
        """The aggregate over base rows, e.g. ``SUM(amount - canceled_amount)``."""
        if self.kind == "count":
            return exp.Count(this=exp.Star())
        assert self.expression is not None
        return exp.Sum(this=self.expression.copy())


def parse_metric(name: str, text: str, column_types: Mapping[str, str]) -> Metric:
    try:
        tree = sqlglot.parse_one(text)
    except sqlglot.errors.ParseError as exc:
        raise ValueError(f"cannot parse {text!r}") from exc
    if isinstance(tree, exp.Count) and isinstance(tree.this, exp.Star):
        return Metric(
            name,
            "count",
            None,
            (),
            lambda _row: 1,
            lambda table: pa.repeat(pa.scalar(1, pa.int64()), table.num_rows),
        )
    if not isinstance(tree, exp.Sum):
        raise ValueError(f"{text!r}: only count(*) and sum(<integer expression>) can be retracted")
    inner = tree.this
    columns: list[str] = []
    evaluate = _compile(inner, column_types, columns)
    vectorised = _compile_arrow(inner)
    return Metric(name, "sum", inner, tuple(dict.fromkeys(columns)), evaluate, vectorised)


def _compile_arrow(node: exp.Expression) -> Callable[[pa.Table], pa.Array]:
    """The same expression over Arrow columns (validated already by ``_compile``)."""
    if isinstance(node, exp.Paren):
        return _compile_arrow(node.this)
    if isinstance(node, exp.Column):
        name = node.name
        return lambda t: pc.fill_null(t.column(name), 0)
    if isinstance(node, exp.Literal):
        value = int(node.this)
        return lambda t: pa.repeat(pa.scalar(value, pa.int64()), t.num_rows)
    if isinstance(node, exp.Neg):
        inner = _compile_arrow(node.this)
        return lambda t: pc.negate_checked(inner(t))
    left, right = _compile_arrow(node.this), _compile_arrow(node.expression)
    if isinstance(node, exp.Add):
        return lambda t: pc.add_checked(left(t), right(t))
    return lambda t: pc.subtract_checked(left(t), right(t))


def _compile(
    node: exp.Expression, types: Mapping[str, str], seen: list[str]
) -> Callable[[Mapping[str, Any]], int]:
    if isinstance(node, exp.Paren):
        return _compile(node.this, types, seen)
    if isinstance(node, exp.Column):
        col = node.name
        if types.get(col) != "int":
            raise ValueError(f"column {col!r} is not a declared int column")
        seen.append(col)
        return lambda row: int(row[col] or 0)
    if isinstance(node, exp.Literal) and not node.is_string:
        value = int(node.this)
        return lambda _row: value
    if isinstance(node, exp.Neg):
        inner = _compile(node.this, types, seen)
        return lambda row: -inner(row)
    if isinstance(node, exp.Add | exp.Sub):
        left = _compile(node.this, types, seen)
        right = _compile(node.expression, types, seen)
        if isinstance(node, exp.Add):
            return lambda row: left(row) + right(row)
        return lambda row: left(row) - right(row)
    raise ValueError(f"unsupported expression {node.sql()!r}: use int columns, + and -")

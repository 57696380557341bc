"""Which events a sink keeps: a deterministic sample by key and a filter predicate,
declared per sink in the spec (``[sinks.search] sample = 0.1, filter = "..."``).

The sample is decided by the key alone (a hash of it below the share), so a key is
always in or always out, and its later versions follow it: a 10% search index holds
whole entities, never some versions of them. Shares nest: a key in a 10% sample is in
every larger one.

A filter is a SQL predicate over the event's columns, parsed and checked with sqlglot
when the spec loads (an unknown column or an unsupported construct is refused, with
the spec file and field named) and compiled to a pyarrow expression, evaluated on
each batch at once. It is evaluated per version: to keep all versions of a key
together, filter on what never changes between them (the tenant, the partition time,
an endpoint of a log line).

Supported: comparisons (``= != <> < <= > >=``), ``AND OR NOT``, ``IN (...)``,
``BETWEEN``, ``IS [NOT] NULL``, string, integer and boolean literals, parentheses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

_BUCKETS = 2**64
_ARROW = {
    "string": pa.string(),
    "int": pa.int64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "bool": pa.bool_(),
}


def parse_filter(text: str, columns: Mapping[str, str]) -> exp.Expression:
    """The predicate ``text`` as a checked sqlglot tree; ValueError naming what is
    wrong (an unknown column, a construct this evaluator does not take)."""
    try:
        tree = sqlglot.parse_one(text)
    except sqlglot.errors.ParseError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"not a SQL predicate: {first}") from None
    for node in tree.walk():
        if isinstance(node, exp.Column):
            if node.table or node.name not in columns:
                raise ValueError(f"unknown column {node.sql()!r}")
        elif not isinstance(node, _ALLOWED):
            raise ValueError(f"unsupported in a filter: {node.sql()!r}")
    if not isinstance(tree, _PREDICATES):
        raise ValueError(f"not a predicate: {tree.sql()!r}")
    empty = pa.table({name: pa.array([], _ARROW[typ]) for name, typ in columns.items()})
    try:  # on no rows, so what cannot be evaluated (a time against a string) fails here
        empty.filter(compile_filter(tree))
    except (pa.ArrowException, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"cannot be evaluated on the declared column types: {first}") from None
    return tree


def compile_filter(tree: exp.Expression) -> pc.Expression:
    """``tree`` (from :func:`parse_filter`) as a pyarrow expression; SQL's three-valued
    logic holds: a comparison with a null is null, and a null row is not kept."""
    return _arrow(tree)


def in_sample(key: str, share: float) -> bool:
    """Whether ``key`` falls in a sample of ``share`` (0 < share ≤ 1), the same on every
    process and every run."""
    if share >= 1:
        return True
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * _BUCKETS


def sample_mask(keys: pa.Array | pa.ChunkedArray, share: float) -> pa.Array:
    """A boolean mask: which of ``keys`` are in a sample of ``share``."""
    return pa.array([in_sample(k, share) for k in keys.to_pylist()], pa.bool_())


_PREDICATES = (
    exp.EQ,
    exp.NEQ,
    exp.LT,
    exp.LTE,
    exp.GT,
    exp.GTE,
    exp.And,
    exp.Or,
    exp.Not,
    exp.In,
    exp.Between,
    exp.Is,
    exp.Paren,
    exp.Boolean,
)
_ALLOWED = (*_PREDICATES, exp.Column, exp.Identifier, exp.Literal, exp.Null, exp.Neg, exp.Tuple)

_BINARY: dict[type[exp.Expression], Callable[[Any, Any], Any]] = {
    exp.EQ: lambda a, b: a == b,
    exp.NEQ: lambda a, b: a != b,
    exp.LT: lambda a, b: a < b,
    exp.LTE: lambda a, b: a <= b,
    exp.GT: lambda a, b: a > b,
    exp.GTE: lambda a, b: a >= b,
    exp.And: lambda a, b: a & b,
    exp.Or: lambda a, b: a | b,
}


def _arrow(node: exp.Expression) -> Any:
    if isinstance(node, exp.Paren):
        return _arrow(node.this)
    if isinstance(node, exp.Column):
        return pc.field(node.name)
    if isinstance(node, exp.Literal):
        return pc.scalar(_literal(node))
    if isinstance(node, exp.Neg):
        return pc.scalar(-_literal(node.this))
    if isinstance(node, exp.Boolean):
        return pc.scalar(bool(node.this))
    if isinstance(node, exp.Not):
        return ~_arrow(node.this)
    if isinstance(node, exp.Is):
        if not isinstance(node.expression, exp.Null):
            raise ValueError(f"unsupported in a filter: {node.sql()!r}")
        return _arrow(node.this).is_null()
    if isinstance(node, exp.In):
        values = [_value(v) for v in node.expressions]
        this = _arrow(node.this)
        # Arrow's isin says false for a null, SQL says unknown (so NOT IN keeps no null)
        return pc.if_else(this.is_null(), pc.scalar(pa.scalar(None, pa.bool_())), this.isin(values))
    if isinstance(node, exp.Between):
        this = _arrow(node.this)
        return (this >= _arrow(node.args["low"])) & (this <= _arrow(node.args["high"]))
    op = _BINARY.get(type(node))
    if op is None:
        raise ValueError(f"unsupported in a filter: {node.sql()!r}")
    return op(_arrow(node.this), _arrow(node.expression))


def _literal(node: exp.Expression) -> Any:
    if not isinstance(node, exp.Literal):
        raise ValueError(f"not a literal: {node.sql()!r}")
    return node.this if node.is_string else int(node.this)


def _value(node: exp.Expression) -> Any:
    if isinstance(node, exp.Neg):
        return -_literal(node.this)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    return _literal(node)

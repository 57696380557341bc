"""``sqlguard.scope`` alone (a pure rewrite): each datasource of a join is narrowed by
its own tenant column, and an engine without joins refuses them with a reason."""

from __future__ import annotations

import pytest
import sqlglot
from hypothesis import given
from hypothesis import strategies as st
from sqlglot import exp

from query_api.sqlguard import scope
from tally.errors import InvalidArgument

TENANTS = {"orders": "shop_id", "payouts": "seller_id", "orders_daily": "shop_id"}


def _scoped(sql: str, joins: bool = True) -> exp.Expr:
    out = scope(
        sql,
        "mysql",
        tenant_columns=TENANTS,
        tenant="t1",
        engine_dialect="duckdb",
        row_limit=100,
        joins=joins,
    )
    assert out.params == tuple("t1" for _ in out.params)
    return sqlglot.parse_one(out.sql, read="duckdb")


def _narrowed(tree: exp.Expr) -> list[tuple[str, str]]:
    """(table, column of its tenant predicate) for every datasource read."""
    found = []
    for table in tree.find_all(exp.Table):
        select = table.find_ancestor(exp.Select)
        assert select is not None
        where = select.args.get("where")
        assert where is not None, f"{table.name} is read without a tenant predicate"
        eq = where.this
        assert isinstance(eq, exp.EQ) and isinstance(eq.expression, exp.Placeholder)
        found.append((table.name, eq.this.name))
    return found


@given(
    left=st.sampled_from(sorted(TENANTS)),
    right=st.sampled_from(sorted(TENANTS)),
    kind=st.sampled_from(["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN", "CROSS JOIN", ","]),
)
def test_each_side_of_a_join_is_narrowed_by_its_own_tenant_column(
    left: str, right: str, kind: str
) -> None:
    on = "" if kind in ("CROSS JOIN", ",") else " ON 1 = 1"
    tree = _scoped(f"SELECT * FROM {left} a {kind} {right} b{on}")
    assert sorted(_narrowed(tree)) == sorted([(left, TENANTS[left]), (right, TENANTS[right])])


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders a JOIN payouts b ON a.id = b.id",
        "SELECT * FROM orders a, payouts b",
        "SELECT * FROM (SELECT * FROM orders) a CROSS JOIN orders_daily b",
    ],
)
def test_an_engine_without_joins_refuses_them_with_a_reason(sql: str) -> None:
    with pytest.raises(InvalidArgument, match="does not join"):
        _scoped(sql, joins=False)


def test_an_engine_without_joins_still_takes_a_subquery_predicate() -> None:
    tree = _scoped("SELECT * FROM orders WHERE id IN (SELECT id FROM payouts)", joins=False)
    assert sorted(_narrowed(tree)) == [("orders", "shop_id"), ("payouts", "seller_id")]

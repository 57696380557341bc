"""The tables generated from the spec, and `tally starrocks ddl|apply`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlglot
from sqlglot import exp

from storage.starrocks import ddl
from storage.starrocks.store import compact_statement, partition_name
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.ingest.conftest import env_for
from tests.storage.starrocks.target import Target


def test_each_statement_parses_as_starrocks_and_keys_what_the_spec_says(
    registry: SpecRegistry,
) -> None:
    """Pure: sqlglot's starrocks dialect parses every statement; the payments table is
    a Primary Key table keyed by txn_id and _pt, partitioned by day of _pt, ordered by
    merchant and time; each rollup an Aggregate table whose metrics are SUMs."""
    spec = registry.get("payments")
    out = {s.table: s for s in ddl.statements(Settings(), list(registry))}
    base = ddl.check(out["payments"].sql)
    pk = next(e for e in base.this.expressions if isinstance(e, exp.PrimaryKey))
    assert [e.name for e in pk.expressions] == ["txn_id", "_pt"]
    assert "DATE_TRUNC('DAY', `_pt`)" in base.sql("starrocks")
    assert "ORDER BY (`merchant_id`, `approved_at`)" in base.sql("starrocks")
    for rollup in spec.rollups:
        tree = ddl.check(out[rollup.name].sql)
        (key,) = [
            p
            for p in tree.args["properties"].expressions
            if isinstance(p, exp.AggregateKeyProperty)
        ]
        assert [e.name for e in key.expressions] == ["bucket", "_pt", *rollup.dimensions]
        sums = {
            c.name
            for c in tree.this.expressions
            if any(isinstance(k.args.get("kind"), exp.Var) for k in c.args.get("constraints", []))
        }
        assert sums == {m.name for m in spec.parsed_metrics}
    assert {s.kind for s in out.values()} >= {"database", "primary_key", "aggregate", "offsets"}


def test_compact_is_a_command_sqlglot_keeps_verbatim() -> None:
    """Pure. sqlglot has no tree for ``ALTER TABLE … COMPACT``: it parses as an opaque
    Command that renders back unchanged, which is why it is the one statement built
    as text (from identifiers sqlglot quotes)."""
    sql = compact_statement(Settings(), "payments", partition_name("2026-11-05"))
    tree = sqlglot.parse_one(sql, read="starrocks")
    assert isinstance(tree, exp.Command)
    assert tree.sql("starrocks") == sql == "ALTER TABLE `tally`.`payments` COMPACT `p20261105`"
    assert partition_name("2026-11") == "p202611"


def _tally(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tally", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_ddl_prints_json_and_apply_creates_only_what_is_missing(
    starrocks: Target, tmp_path: Path
) -> None:
    """`tally starrocks apply` twice: created, then exists. On the stand-in this does
    not prove that StarRocks accepts each statement (sqlglot parses them; the
    stand-in builds DuckDB tables from the parsed tree)."""
    settings = starrocks.settings(tmp_path, SpecRegistry([]))  # an empty database of its own
    env = env_for(settings)
    printed = _tally("starrocks", "ddl", "--format", "json", env=env)
    assert printed.returncode == 0, printed.stderr
    kinds = [s["kind"] for s in json.loads(printed.stdout)["statements"]]
    assert kinds[0] == "database" and "primary_key" in kinds and "aggregate" in kinds
    first = _tally("starrocks", "apply", "--format", "json", env=env)
    assert first.returncode == 0, first.stderr
    results = {t["table"]: t["result"] for t in json.loads(first.stdout)["tables"]}
    assert results["payments"] == "created" and results["payments_hourly"] == "created"
    assert results["tally_offsets"] == "exists"  # the fixture made the shared tables
    again = _tally("starrocks", "apply", "--format", "json", env=env)
    assert {t["result"] for t in json.loads(again.stdout)["tables"]} == {"exists"}


def test_apply_with_starrocks_unreachable_is_one_line() -> None:
    """Nothing listens on the port: one line on stderr, no traceback."""
    env = {"TALLY_STARROCKS__HOST": "127.0.0.1", "TALLY_STARROCKS__QUERY_PORT": "1"}
    done = _tally("starrocks", "apply", env=env)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "StarRocks" in lines[0] and "Traceback" not in done.stderr

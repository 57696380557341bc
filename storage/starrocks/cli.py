"""``tally starrocks ddl|apply``: the tables Tally generates for StarRocks, printed or
created (idempotent: ``CREATE … IF NOT EXISTS``)."""

from __future__ import annotations

import typer

from tally.clikit import FormatOption, state
from tally.output import Format, emit_json, emit_table

starrocks_app = typer.Typer(
    help="StarRocks: the Primary Key and Aggregate tables generated from the datasource specs.",
    no_args_is_help=True,
)


@starrocks_app.command("ddl")
def ddl_command(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Print every statement `tally starrocks apply` sends, in order. Needs no StarRocks."""
    from storage.starrocks.ddl import statements

    c = state(ctx)
    out = statements(c.settings, list(c.registry))
    if fmt is Format.json:
        emit_json({"statements": [{"table": s.table, "kind": s.kind, "sql": s.sql} for s in out]})
    else:
        for st in out:
            typer.echo(f"{st.sql};\n")


@starrocks_app.command("apply")
def apply(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Create the database and every table that is missing (existing ones are left
    as they are, reported "exists")."""
    from storage.starrocks.connection import Connection
    from storage.starrocks.ddl import q, statements

    c = state(ctx)
    sr = c.settings.starrocks
    conn = Connection(sr, database=False)
    try:
        _names, rows = conn.execute("SHOW DATABASES")
        databases = {r[0] for r in rows}
        existing: set[str] = set()
        if sr.database in databases:
            _names, rows = conn.execute(f"SHOW TABLES FROM {q(sr.database)}")
            existing = {r[0] for r in rows}
        results = []
        for st in statements(c.settings, list(c.registry)):
            name = st.table or sr.database
            there = name in (existing if st.table else databases)
            if not there:
                conn.execute(st.sql)
            results.append(
                {"table": name, "kind": st.kind, "result": "exists" if there else "created"}
            )
    finally:
        conn.close()
    if fmt is Format.json:
        emit_json({"tables": results})
    else:
        emit_table(
            ["table", "kind", "result"], [[r["table"], r["kind"], r["result"]] for r in results]
        )

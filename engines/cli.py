"""``tally engines up|status|down``: real engines on loopback, for development and tests.

``up`` returns once every named engine answers and leaves them running; its JSON
line carries ``env``, the ``TALLY_*`` settings that point a Tally process at them.
A missing Java or Maven, an artifact that cannot be resolved, or an unknown engine
name is one line on stderr and exit code 2 (``EngineUnavailable.exit_code``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

import engines
from engines.base import Engine
from tally.clikit import FormatOption, state
from tally.output import Format, emit_json, emit_table

app = typer.Typer(
    help="Real engines (Apache Kafka, Apache Druid, OpenSearch) as local processes on"
    " loopback, from Maven Central.",
    no_args_is_help=True,
)

NamesArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="NAME", help=f"engine names: {', '.join(engines.names())}"),
]


def _pick(ctx: typer.Context, names: list[str] | None) -> list[Engine]:
    """The named engines (validated before anything starts), or every known one."""
    chosen = list(dict.fromkeys(names or engines.names()))
    unknown = [n for n in chosen if n not in engines.REGISTRY]
    if unknown:
        raise typer.BadParameter(
            f"unknown engine {', '.join(map(repr, unknown))} (known: {', '.join(engines.names())})",
            param_hint="NAME",
        )
    data_dir = state(ctx).settings.data_dir
    return [engines.get(n, data_dir) for n in chosen]


def _table(docs: dict[str, dict[str, Any]]) -> None:
    """One row per engine, then one per process of an engine that has several
    (``druid/broker``), with that process's pid and log."""
    rows: dict[str, dict[str, Any]] = {}
    for name, doc in docs.items():
        rows[name] = {k: v for k, v in doc.items() if k != "processes"}
        for role, proc in doc.get("processes", {}).items():
            rows[f"{name}/{role}"] = proc
    keys = list(dict.fromkeys(k for doc in rows.values() for k in doc))
    emit_table(["engine", *keys], [[name, *(d.get(k) for k in keys)] for name, d in rows.items()])


@app.command("up")
def up_command(
    ctx: typer.Context,
    names: Annotated[
        list[str],
        typer.Argument(metavar="NAME", help=f"engine names: {', '.join(engines.names())}"),
    ],
    fmt: FormatOption = Format.table,
) -> None:
    """Start the named engines (again on the same ports with their data, if they ran
    before) and return once each answers; they keep running."""
    chosen = _pick(ctx, names)
    docs: dict[str, dict[str, Any]] = {}
    env: dict[str, str] = {}
    for engine in chosen:
        docs[engine.name] = engine.up()
        env |= engine.env()
    if fmt is Format.json:
        emit_json({"engines": docs, "env": env})
        return
    _table(docs)
    for key, value in env.items():
        typer.echo(f"export {key}={value}")


@app.command("status")
def status_command(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Every engine: pid, whether it runs, its address and the path of its log."""
    docs = {e.name: e.status() for e in _pick(ctx, None)}
    if fmt is Format.json:
        emit_json({"engines": docs})
    else:
        _table(docs)


@app.command("down")
def down_command(
    ctx: typer.Context, names: NamesArg = None, fmt: FormatOption = Format.table
) -> None:
    """Stop the named engines (default: every running one); their data and ports stay."""
    chosen = [e for e in _pick(ctx, names) if names or e.running() is not None]
    docs = {e.name: e.stop() for e in chosen}
    if fmt is Format.json:
        emit_json({"engines": docs})
    else:
        _table(docs)

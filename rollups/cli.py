"""``tally rollups status|rebuild``."""

from __future__ import annotations

from typing import Annotated

import typer

from tally.clikit import FormatOption, state
from tally.output import Format, emit_json, emit_table

rollups_app = typer.Typer(help="Inspect and rebuild ingestion-time rollups.", no_args_is_help=True)


@rollups_app.command("status")
def status(
    ctx: typer.Context,
    datasource: Annotated[str | None, typer.Option(help="limit to one datasource")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Per rollup: granularity, dimensions, live segments, rows and bytes."""
    from storage import open_store

    c = state(ctx)
    specs = [c.registry.get(datasource)] if datasource else list(c.registry)
    store = open_store(c.settings, c.registry)
    try:
        stats = store.partition_stats(datasource)
    finally:
        store.close()
    out = []
    for spec in specs:
        for rollup in spec.rollups:
            mine = [s for s in stats if s.datasource == rollup.name]
            out.append(
                {
                    "datasource": spec.name,
                    "rollup": rollup.name,
                    "granularity": rollup.granularity,
                    "dimensions": list(rollup.dimensions),
                    "partitions": len(mine),
                    "segments": sum(s.segments for s in mine),
                    "rows": sum(s.rows for s in mine),
                    "bytes": sum(s.bytes for s in mine),
                }
            )
    if fmt is Format.json:
        emit_json({"rollups": out})
    else:
        cols = ["datasource", "rollup", "granularity", "partitions", "segments", "rows", "bytes"]
        emit_table(cols, [[r[k] for k in cols] for r in out])


@rollups_app.command("rebuild")
def rebuild(
    ctx: typer.Context,
    datasource: Annotated[str | None, typer.Option(help="default: every datasource")] = None,
    partition: Annotated[
        str | None, typer.Option(help="base partition key, e.g. 2026-11-22; default: all")
    ] = None,
    rollup: Annotated[str | None, typer.Option(help="one rollup; default: all of them")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Recompute rollups from the merged base and repair every difference found."""
    from storage import open_store

    c = state(ctx)
    specs = [c.registry.get(datasource)] if datasource else list(c.registry)
    store = open_store(c.settings, c.registry)
    try:
        reports = [r for spec in specs for r in store.rebuild_rollups(spec.name, partition, rollup)]
    finally:
        store.close()
    if fmt is Format.json:
        emit_json({"rebuilt": [r.as_dict() for r in reports]})
        return
    emit_table(
        ["rollup", "partition", "groups_repaired"],
        [[r.rollup, r.partition or "all", r.groups_repaired] for r in reports],
    )
    for r in reports:
        for diff in r.differences:
            typer.echo(f"repaired {r.rollup}: {diff}")

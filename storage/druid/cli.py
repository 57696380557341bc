"""``tally druid specs|apply``: the supervisor specs Tally generates for Druid."""

from __future__ import annotations

import json

import typer

from tally.clikit import FormatOption, state
from tally.output import Format, emit_json, emit_table

druid_app = typer.Typer(
    help="Apache Druid: the Kafka supervisor specs generated from the datasource specs.",
    no_args_is_help=True,
)


@druid_app.command("specs")
def specs(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Print the supervisor spec of every datasource, as `tally druid apply` would
    submit it (the Kafka password redacted). Needs no Druid."""
    from storage.druid.supervisor import supervisor_spec

    c = state(ctx)
    out = [supervisor_spec(c.settings, spec, secrets=False) for spec in c.registry]
    if fmt is Format.json:
        emit_json({"supervisors": out})
    else:
        for item in out:
            typer.echo(json.dumps(item, indent=2))


@druid_app.command("apply")
def apply(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Submit each datasource's supervisor spec to Druid's overlord (idempotent: a spec
    Druid already runs is left alone and reported unchanged)."""
    from storage.druid.overlord import Overlord
    from storage.druid.supervisor import datasource_name, supervisor_spec

    c = state(ctx)
    overlord = Overlord(c.settings)
    results = []
    for spec in c.registry:
        sid = datasource_name(c.settings, spec)
        result = overlord.apply(sid, supervisor_spec(c.settings, spec))
        results.append({"supervisor": sid, "result": result})
    if fmt is Format.json:
        emit_json({"supervisors": results})
    else:
        emit_table(["supervisor", "result"], [[r["supervisor"], r["result"]] for r in results])

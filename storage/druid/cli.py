"""``tally druid specs|apply|status|suspend|resume|reset``: the supervisor specs Tally
generates for Druid, and what an operator does with the supervisors running them."""

from __future__ import annotations

import json

import typer

from tally.clikit import Context, FormatOption, state
from tally.errors import InvalidArgument, NotFound
from tally.output import Format, emit_json, emit_table

druid_app = typer.Typer(
    help="Apache Druid: the Kafka supervisor specs generated from the datasource specs.",
    no_args_is_help=True,
)


@druid_app.command("specs")
def specs(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Print the supervisor spec of every datasource, as `tally druid apply` would
    submit it (the Kafka password redacted). Needs no Druid."""
    from storage.druid.supervisor import supervisors

    c = state(ctx)
    out = [s for spec in c.registry for s in supervisors(c.settings, spec, secrets=False).values()]
    if fmt is Format.json:
        emit_json({"supervisors": out})
    else:
        for item in out:
            typer.echo(json.dumps(item, indent=2))


@druid_app.command("apply")
def apply(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Submit each datasource's supervisor specs (its base and each rollup) to Druid's
    overlord (idempotent: a spec Druid already runs is left alone, reported unchanged)."""
    from storage.druid.overlord import Overlord
    from storage.druid.supervisor import supervisors

    c = state(ctx)
    overlord = Overlord(c.settings)
    results = []
    for spec in c.registry:
        for sid, body in supervisors(c.settings, spec).items():
            results.append({"supervisor": sid, "result": overlord.apply(sid, body)})
    if fmt is Format.json:
        emit_json({"supervisors": results})
    else:
        emit_table(["supervisor", "result"], [[r["supervisor"], r["result"]] for r in results])


@druid_app.command("status")
def status(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Each supervisor (base and rollups) as Druid reports it: state, health, lag."""
    from storage.druid.overlord import Overlord

    c = state(ctx)
    overlord = Overlord(c.settings)
    rows = []
    for sid in _supervisors(c, None):
        payload = overlord.status(sid) or {}
        rows.append(
            {
                "supervisor": sid,
                "state": payload.get("state", "absent"),
                "detailed_state": payload.get("detailedState"),
                "healthy": payload.get("healthy"),
                "aggregate_lag": payload.get("aggregateLag"),
                "stream": payload.get("stream"),
            }
        )
    if fmt is Format.json:
        emit_json({"supervisors": rows})
    else:
        keys = ["supervisor", "state", "detailed_state", "healthy", "aggregate_lag"]
        emit_table(keys, [[r[k] for k in keys] for r in rows])


DatasourceOption = typer.Option(None, "--datasource", help="one datasource (default: all)")


def _supervisors(c: Context, datasource: str | None, *, rollups: bool = True) -> list[str]:
    from storage.druid.supervisor import datasource_name, supervisors

    specs = [c.registry.get(datasource)] if datasource else list(c.registry)
    if not rollups:
        return [datasource_name(c.settings, spec) for spec in specs]
    return [sid for spec in specs for sid in supervisors(c.settings, spec)]


def _act(
    ctx: typer.Context, action: str, datasource: str | None, fmt: Format, *, rollups: bool = True
) -> None:
    from storage.druid.overlord import Overlord

    c = state(ctx)
    overlord = Overlord(c.settings)
    results = []
    for sid in _supervisors(c, datasource, rollups=rollups):
        if not overlord.act(sid, action):
            raise NotFound(f"no supervisor {sid} in Druid (`tally druid apply` submits it)")
        results.append({"supervisor": sid, "result": action})
    if fmt is Format.json:
        emit_json({"supervisors": results})
    else:
        emit_table(["supervisor", "result"], [[r["supervisor"], r["result"]] for r in results])


@druid_app.command("suspend")
def suspend(
    ctx: typer.Context, datasource: str | None = DatasourceOption, fmt: FormatOption = Format.table
) -> None:
    """Suspend ingestion: the supervisor's tasks publish what they read and stop; its
    offsets stay in Druid's metadata, so `resume` continues exactly there."""
    _act(ctx, "suspend", datasource, fmt)


@druid_app.command("resume")
def resume(
    ctx: typer.Context, datasource: str | None = DatasourceOption, fmt: FormatOption = Format.table
) -> None:
    """Resume a suspended supervisor from the offsets Druid stored."""
    _act(ctx, "resume", datasource, fmt)


@druid_app.command("reset")
def reset(
    ctx: typer.Context,
    datasource: str | None = DatasourceOption,
    yes: bool = typer.Option(False, "--yes", help="confirm: Druid forgets its offsets"),
    fmt: FormatOption = Format.table,
) -> None:
    """Make the base supervisor forget its stored offsets and read the refined topic
    again from its earliest retained message: for a topic recreated or offsets Druid
    can no longer use. Rows read twice are removed by merge on read; raw counts grow.
    Rollup supervisors are not reset: deltas read twice would be summed twice."""
    if not yes:
        raise InvalidArgument("reset makes Druid forget its offsets and re-read: pass --yes")
    _act(ctx, "reset", datasource, fmt, rollups=False)

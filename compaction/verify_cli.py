"""``tally verify [--datasource NAME] [--repair]``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from tally.clikit import FormatOption, state
from tally.errors import DifferencesFound
from tally.output import Format, emit_json, emit_table


def verify_command(
    ctx: typer.Context,
    datasource: Annotated[
        str | None, typer.Option(help="default: every datasource, one after the other")
    ] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="fix every difference and say what was fixed")
    ] = False,
    idle: Annotated[
        float, typer.Option(min=0.1, help="the topic has ended once quiet this many seconds")
    ] = 2.0,
    recheck: Annotated[
        float, typer.Option(min=0, help="seconds to wait before re-reading a difference")
    ] = 1.0,
    accept_loss: Annotated[
        bool,
        typer.Option(
            "--accept-loss",
            help="with --repair, rebuild a damaged partition even from a log that no longer"
            " holds all of it (what is lost is listed either way)",
        ),
    ] = False,
    fmt: FormatOption = Format.table,
) -> None:
    """Compare each sink with the log (each datasource in turn, or the one named):
    re-derive the latest state per key from the
    topic, then check the OLAP merged view, every rollup and the search index against
    it. A difference is re-read before it is reported; one that ingestion still
    catching up explains is reported under lagging instead. Kinds: missing, stale,
    unexpected, corrupt, duplicate.

    Exit code 0 when no difference remains (lagging is not one), 1 when differences
    were found and not repaired."""
    from compaction.verify import verify

    c = state(ctx)
    names = [datasource] if datasource is not None else [spec.name for spec in c.registry]
    reports = [
        verify(
            c.settings,
            c.registry,
            name,
            repair=repair,
            idle_s=idle,
            recheck_s=recheck,
            accept_loss=accept_loss,
        )
        for name in names
    ]
    for report in reports:  # JSON: one line per datasource
        _show(report, repair, fmt)
    left = [f"{r.datasource}: {r.remaining} difference(s) remain" for r in reports if r.remaining]
    if left:
        hint = "" if repair else " (tally verify --repair fixes them)"
        raise DifferencesFound("; ".join(left) + hint)


def _show(report: Any, repair: bool, fmt: Format) -> None:
    if fmt is Format.json:
        emit_json(report.as_dict())
        return
    typer.echo(
        f"{report.topic} → {report.datasource}: {report.events_read} events read,"
        f" {report.dead_lettered} dead-lettered, {report.keys_checked} keys checked"
    )
    fixed = {(d["sink"], d["kind"], _subject(d)): d["action"] for d in report.repaired}
    rows = []
    for diff in report.differences:
        subject = _subject(diff.as_dict())
        action = fixed.get((diff.sink, diff.kind, subject), "no" if repair else "")
        rows.append(
            [diff.sink, diff.kind, subject, _values(diff.expected), _values(diff.found), action]
        )
    if rows:
        emit_table(["sink", "kind", "subject", "expected", "found", "repaired"], rows)
    else:
        typer.echo("no differences")
    for sink, lag in report.lagging.items():
        typer.echo(f"lagging: {sink} {_values(lag)}")
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.damage is not None:
        _show_damage(report.damage)


def _show_damage(damage: Any) -> None:
    for d in damage.damaged:
        typer.echo(f"damaged: {d.datasource}/{d.partition}: {d.reason}")
    for name in damage.restored:
        typer.echo(f"restored from the log: {name}")
    for loss in damage.lost:
        keys = ", ".join(loss.keys[:20]) + (" …" if len(loss.keys) > 20 else "")
        gone = ", ".join(f"[{p}] 0..{at - 1}" for p, at in sorted(loss.removed.items()))
        typer.echo(
            f"lost: {damage.datasource}/{loss.partition} ({loss.start.isoformat()} to"
            f" {loss.end.isoformat()}): {len(loss.keys)} key(s) the log no longer holds"
            f" (retention removed offsets {gone}){': ' + keys if keys else ''}"
        )
    for name in damage.left:
        typer.echo(f"not restored: {name} (tally verify --repair; --accept-loss if lost)")


def _subject(d: dict[str, Any]) -> str:
    if "key" in d:
        return str(d["key"])
    group = " ".join(_text(v) for v in d.get("group", {}).values())
    return f"{d.get('rollup')} {group}"


def _values(values: Any) -> str:
    if not values:
        return ""
    return " ".join(f"{k}={_text(v)}" for k, v in values.items())


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)

"""``tally topics|ingest|dlq``: the consuming side."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from tally.clikit import FormatOption, LogFormatOption, state
from tally.errors import TallyError
from tally.logs import LogFormat, setup_logging
from tally.output import Format, emit_json, emit_table

topics_app = typer.Typer(
    help="Topics and dead-letter topics from the datasource specs.", no_args_is_help=True
)
dlq_app = typer.Typer(
    help="Dead letters: list them, replay them once the cause is fixed.", no_args_is_help=True
)


@topics_app.command("create")
def topics_create(
    ctx: typer.Context,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="default: ingest.partitions (6)")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create each datasource's topic and dead-letter topic (idempotent)."""
    from ingest.kafka import ensure_topics

    c = state(ctx)
    report = ensure_topics(c.settings, c.registry, partitions)
    if fmt is Format.json:
        emit_json({"topics": report})
    else:
        emit_table(
            ["topic", "partitions", "created"],
            [[r["topic"], r["partitions"], r["created"]] for r in report],
        )


ingest_app = typer.Typer(
    help="Consume the datasource topics into the OLAP store and the search index.",
)


@ingest_app.callback(invoke_without_command=True)
def ingest(
    ctx: typer.Context,
    datasource: Annotated[str | None, typer.Option(help="default: every datasource")] = None,
    sink: Annotated[str, typer.Option(help="olap, search or all")] = "all",
    until_idle: Annotated[
        float | None, typer.Option(min=0.1, help="exit after this many idle seconds")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics here")] = None,
    fmt: FormatOption = Format.table,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Consume the datasource topics into the OLAP store and the search index
    (``tally ingest reset``: decide for partitions whose stored position was refused)."""
    from ingest.service import run_ingest

    if ctx.invoked_subcommand is not None:
        return
    if sink not in ("olap", "search", "all"):
        raise typer.BadParameter(f"{sink!r} is not one of olap, search, all", param_hint="--sink")
    c = state(ctx)
    specs = [c.registry.get(datasource)] if datasource else list(c.registry)
    sinks = ["olap", "search"] if sink == "all" else [sink]
    setup_logging(log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = metrics_port if metrics_port is not None else c.settings.ingest.metrics_port
    reports = run_ingest(c.settings, specs, sinks, stop, until_idle, port)
    rows = [r.__dict__ for r in reports]
    if fmt is Format.json:
        emit_json({"sinks": rows})
    else:
        cols = [
            "sink",
            "datasource",
            "consumed",
            "written",
            "stale",
            "rejected",
            "batches",
            "fenced",
            "error",
        ]
        emit_table(cols, [[r[k] for k in cols] for r in rows])
    failed = [r for r in reports if r.error]
    if failed:
        raise TallyError("; ".join(f"{r.sink}/{r.datasource}: {r.error}" for r in failed))


@ingest_app.command("reset")
def ingest_reset(
    ctx: typer.Context,
    datasource: Annotated[str, typer.Option(help="the datasource whose sink stopped")],
    sink: Annotated[str, typer.Option(help="olap or search")],
    to: Annotated[
        str,
        typer.Option(
            help="earliest (read the log again from its start), latest (skip what it"
            " holds), stored (keep the offsets, adopt the log they are in)"
        ),
    ],
    by: Annotated[str | None, typer.Option(help="who decides (default: user@host)")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Set a sink's positions after a stop (its ingesters stopped first); recorded
    with the topic's id and who/when. Then `tally verify` tells what the store misses
    or holds beyond the log."""
    from ingest.reset import MODES, SINKS, reset

    if sink not in SINKS:
        raise typer.BadParameter(f"{sink!r} is not one of {', '.join(SINKS)}", param_hint="--sink")
    if to not in MODES:
        raise typer.BadParameter(f"{to!r} is not one of {', '.join(MODES)}", param_hint="--to")
    c = state(ctx)
    rows = reset(c.settings, c.registry, c.registry.get(datasource), sink, to, by)
    if fmt is Format.json:
        emit_json({"datasource": datasource, "sink": sink, "to": to, "partitions": rows})
    else:
        cols = ["partition", "stored", "now", "log_start", "log_end", "stored_log", "log"]
        emit_table(cols, [[r[k] for k in cols] for r in rows])


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    datasource: Annotated[str, typer.Option()] = "payments",
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Dead letters with their reason, sink and source topic/partition/offset."""
    from ingest.deadletter import list_dead_letters

    c = state(ctx)
    letters = list_dead_letters(c.settings, c.registry.get(datasource), limit)
    if fmt is Format.json:
        emit_json({"dead_letters": letters})
    else:
        cols = ["sink", "topic", "partition", "offset", "reason"]
        emit_table(cols, [[d.get(k) for k in cols] for d in letters])


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    datasource: Annotated[str, typer.Option()] = "payments",
    fmt: FormatOption = Format.table,
) -> None:
    """Republish dead letters not replayed before to their source topic."""
    from ingest.deadletter import replay

    c = state(ctx)
    sent = replay(c.settings, c.registry.get(datasource))
    if fmt is Format.json:
        emit_json({"replayed": sent})
    else:
        typer.echo(f"replayed {sent} dead letter(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(topics_app, name="topics")
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(ingest_app, name="ingest")

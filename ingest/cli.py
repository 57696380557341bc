"""``tally broker|topics|generate|publish|ingest|dlq``."""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from tally.cli import FormatOption, LogFormatOption, state
from tally.errors import TallyError
from tally.logs import LogFormat, setup_logging
from tally.output import Format, emit_json, emit_table

broker_app = typer.Typer(
    help="A local Kafka-protocol broker for development (tansu, in memory).", no_args_is_help=True
)
topics_app = typer.Typer(
    help="Topics and dead-letter topics from the datasource specs.", no_args_is_help=True
)
dlq_app = typer.Typer(
    help="Dead letters: list them, replay them once the cause is fixed.", no_args_is_help=True
)


def _status_out(status: dict[str, object], fmt: Format) -> None:
    if fmt is Format.json:
        emit_json(status)
    else:
        emit_table(list(status), [list(status.values())])


@broker_app.command("up")
def broker_up(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Start the broker on TALLY_KAFKA_BOOTSTRAP (keeps nothing across restarts)."""
    from ingest.broker import DevBroker

    _status_out(DevBroker(state(ctx).settings).up().as_dict(), fmt)


@broker_app.command("down")
def broker_down(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Stop the broker; every topic and message is gone."""
    from ingest.broker import DevBroker

    _status_out(DevBroker(state(ctx).settings).down().as_dict(), fmt)


@broker_app.command("status")
def broker_status(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Bootstrap address, pid, and whether the broker is reachable."""
    from ingest.broker import DevBroker

    _status_out(DevBroker(state(ctx).settings).status().as_dict(), fmt)


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


def _parse_start(text: str | None) -> datetime | None:
    if text is None:
        return None
    from tally.timeutil import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--start") from None


def generate(
    ctx: typer.Context,
    transactions: Annotated[
        int, typer.Option(min=0, help="approved payments to generate")
    ] = 10_000,
    merchants: Annotated[int, typer.Option(min=1)] = 50,
    days: Annotated[int, typer.Option(min=1)] = 30,
    start: Annotated[str | None, typer.Option(help="RFC 3339 start of the window")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    cancel_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.08,
    duplicate_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    out_of_order_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.02,
    malformed_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.002,
    out: Annotated[Path | None, typer.Option("--out", help="write JSON lines here")] = None,
    publish: Annotated[bool, typer.Option("--publish", help="publish to the topic")] = False,
    rate: Annotated[
        float | None, typer.Option(min=1, help="with --publish: events per second")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Realistic synthetic payments: skewed merchants, Korean and English names, late
    cancellations with the original approved_at, duplicates, out-of-order versions and
    malformed messages. Deterministic for a --seed."""
    from ingest.generate import GeneratorConfig, generate_events
    from ingest.malformed import with_malformed
    from ingest.publish import Publisher

    if (out is None) == (not publish):
        raise typer.BadParameter("give exactly one of --out FILE or --publish", param_hint="--out")
    kwargs: dict[str, object] = {}
    if (begin := _parse_start(start)) is not None:
        kwargs["start"] = begin
    config = GeneratorConfig(
        transactions=transactions,
        merchants=merchants,
        days=days,
        seed=seed,
        cancel_rate=cancel_rate,
        duplicate_rate=duplicate_rate,
        out_of_order_rate=out_of_order_rate,
        **kwargs,  # type: ignore[arg-type]
    )
    wires = with_malformed(generate_events(config), malformed_rate, seed)
    counts = {"events": 0, "malformed": 0}
    if out is not None:
        with out.open("wb") as fh:
            for wire in wires:
                fh.write(wire.value + b"\n")
                counts["events"] += 1
                counts["malformed"] += wire.malformed is not None
        report: dict[str, object] = {**counts, "out": str(out)}
    else:
        c = state(ctx)
        spec = c.registry.get("payments")
        pub = Publisher(c.settings, c.settings.topic(spec.datasource.topic))
        sent = pub.send(wires, rate=rate, counts=counts)
        report = {**counts, "published": sent, "topic": pub.topic}
    if fmt is Format.json:
        emit_json(report)
    else:
        emit_table(list(report), [list(report.values())])


def publish_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON lines")],
    datasource: Annotated[str, typer.Option(help="whose topic")] = "payments",
    rate: Annotated[float | None, typer.Option(min=1, help="events per second")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Publish events as a domain team would: one message per line, key = entity id."""
    from ingest.publish import Publisher, read_lines

    c = state(ctx)
    spec = c.registry.get(datasource)
    pub = Publisher(c.settings, c.settings.topic(spec.datasource.topic))
    counts = {"events": 0, "unparsable": 0}
    sent = pub.send(read_lines(file, spec.datasource.key, counts), rate=rate, counts=None)
    report = {"published": sent, "unparsable": counts["unparsable"], "topic": pub.topic}
    if fmt is Format.json:
        emit_json(report)
    else:
        emit_table(list(report), [list(report.values())])


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
    """Consume the datasource topics into the OLAP store and the search index."""
    from ingest.service import run_ingest

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
    app.add_typer(broker_app, name="broker")
    app.add_typer(topics_app, name="topics")
    app.add_typer(dlq_app, name="dlq")
    app.command("generate")(generate)
    app.command("publish")(publish_file)
    app.command("ingest")(ingest)

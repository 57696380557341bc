"""``tally generate`` and ``tally publish``: events as domain teams produce them."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from tally.clikit import FormatOption, state
from tally.output import Format, emit_json, emit_record, emit_table


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
    settlements: Annotated[
        bool,
        typer.Option(
            "--settlements",
            help="also the payments' settlements: to their topic, or beside --out as"
            " FILE.settlements.jsonl",
        ),
    ] = False,
    rate: Annotated[
        float | None, typer.Option(min=1, help="with --publish: events per second")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Realistic synthetic payments: skewed merchants, Korean and English names, late
    cancellations with the original approved_at, duplicates, out-of-order versions and
    malformed messages. Deterministic for a --seed."""
    from producers.generate import GeneratorConfig, generate_events
    from producers.malformed import with_malformed
    from producers.publish import Publisher

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
    c = state(ctx)
    outputs = [("payments", with_malformed(generate_events(config), malformed_rate, seed), out)]
    if settlements:
        from producers.settlements import stream_settlements

        spec = c.registry.get("settlements")  # unknown unless the deployment runs it
        wires = with_malformed(stream_settlements(config), malformed_rate, seed, spec=spec)
        beside = out.with_suffix(".settlements.jsonl") if out is not None else None
        outputs.append(("settlements", wires, beside))
    reports: dict[str, dict[str, object]] = {}
    for name, stream, path in outputs:
        counts = {"events": 0, "malformed": 0}
        if path is not None:
            with path.open("wb") as fh:
                for wire in stream:
                    fh.write(wire.value + b"\n")
                    counts["events"] += 1
                    counts["malformed"] += wire.malformed is not None
            done: dict[str, object] = {**counts, "out": str(path)}
        else:
            spec = c.registry.get(name)
            pub = Publisher(c.settings, c.settings.topic(spec.datasource.topic))
            sent = pub.send(stream, rate=rate, counts=counts)
            done = {**counts, "published": sent, "topic": pub.topic}
        reports[name] = done
    if len(reports) == 1:  # one datasource keeps the flat report it always had
        emit_record(reports["payments"], fmt)
    elif fmt is Format.json:
        emit_json(reports)
    else:
        columns = list(reports["payments"])
        emit_table(["datasource", *columns], [[n, *r.values()] for n, r in reports.items()])


def publish_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON lines")],
    datasource: Annotated[str, typer.Option(help="whose topic")] = "payments",
    rate: Annotated[float | None, typer.Option(min=1, help="events per second")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Publish events as a domain team would: one message per line, key = entity id."""
    from producers.publish import Publisher, read_lines

    c = state(ctx)
    spec = c.registry.get(datasource)
    pub = Publisher(c.settings, c.settings.topic(spec.datasource.topic))
    counts = {"events": 0, "unparsable": 0}
    sent = pub.send(read_lines(file, spec.datasource.key, counts), rate=rate, counts=None)
    report = {"published": sent, "unparsable": counts["unparsable"], "topic": pub.topic}
    emit_record(report, fmt)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("publish")(publish_file)

"""The ``tally`` console command.

Every subcommand has ``--help``; commands that report take ``--format json`` and
then print exactly one JSON document. Failures exit non-zero with one line on
stderr: ``error: <reason>`` — never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import Abort, Exit, TyperException

from tally.clikit import Context, FormatOption, state
from tally.errors import TallyError
from tally.output import Format, emit_json, emit_table
from tally.settings import HANDOFF_ENV, from_handoff, load_settings
from tally.specs import SpecRegistry, spec_paths

app = typer.Typer(
    name="tally",
    help="Tally: exactly-once analytics ingestion and queries for payment events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="settings file (default ./tally.toml)")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="overrides TALLY_DATA_DIR")
    ] = None,
) -> None:
    handed = os.environ.get(HANDOFF_ENV)
    if handed and config is None and data_dir is None:
        # A child a Tally process started (the demo's `tally serve`) runs with exactly
        # its parent's settings, the specs it was given included.
        ctx.obj = Context(from_handoff(handed))
    else:
        ctx.obj = Context(load_settings(config, data_dir=data_dir))


@app.command("sql")
def sql_command(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="operator SQL over the merged views")],
    fmt: FormatOption = Format.table,
) -> None:
    """Run operator SQL. Views: each datasource (merged: latest version per key), each
    rollup (deltas summed), and raw.<name> for the segment rows as stored."""
    from storage import open_reader

    c = state(ctx)
    reader = open_reader(c.settings, c.registry)
    try:
        result = reader.query(query)
    finally:
        reader.close()
    if fmt is Format.json:
        emit_json({"columns": result.columns, "rows": result.rows})
    else:
        emit_table(result.columns, result.rows)


class DemoBroker(StrEnum):
    tansu = "tansu"
    kafka = "kafka"


_DEMO_SQL = json.dumps(
    {"sql": "SELECT status, COUNT(*) FROM payments GROUP BY status", "dialect": "mysql"}
)


@app.command("demo")
def demo_command(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option(min=1, help="events per second to stream")] = 2000,
    duration: Annotated[
        float | None, typer.Option(min=1, help="stop after this many seconds (default: Ctrl-C)")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="API port (default api.port, or a free one)"),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    broker: Annotated[
        DemoBroker,
        typer.Option(help="tansu: the development broker; kafka: Apache Kafka (needs Java, Maven)"),
    ] = DemoBroker.tansu,
    fmt: FormatOption = Format.table,
) -> None:
    """Everything on the embedded default: broker, topics, a live stream of payments
    (late cancellations, duplicates, malformed messages), both sinks, the compaction
    watcher and the query API with a demo key. With --format json it prints one line,
    {"url", "api_key"}, once everything answers."""
    from tally.demo import Ready, run_demo

    c = state(ctx)

    def ready(info: Ready) -> None:
        if fmt is Format.json:
            emit_json({"url": info.url, "api_key": info.api_key})
            return
        auth = f'-H "Authorization: Bearer {info.api_key}"'
        today = datetime.now(c.registry.get("payments").tz).date()
        start = (today - timedelta(days=29)).isoformat()
        end = (today + timedelta(days=1)).isoformat()
        typer.echo(
            f"\nThe query API is at {info.url} (OpenAPI: {info.url}/docs); demo key for"
            f" merchant {info.merchant_id}:\n  {info.api_key}\n"
            f"\nMerchant dashboard: {info.url}/dashboard   (sign in with the key above)\n"
            f"Operator console:   {info.url}/console     (admin key: {info.admin_key})\n"
            "\nTry:\n"
            f'  curl {auth} "{info.url}/v1/sales?from={start}T00:00:00%2B09:00'
            f'&to={end}T00:00:00%2B09:00&granularity=day&group_by=method"\n'
            f'  curl {auth} "{info.url}/v1/transactions?limit=5"\n'
            f'  curl {auth} "{info.url}/v1/transactions?q=%EA%B9%80&limit=5"   # q=김\n'
            f"  curl {auth} -H 'Content-Type: application/json' {info.url}/v1/sql"
            f" -d '{_DEMO_SQL}'\n"
            f"  tally compaction status   # late cancellations land in old days; watch them heal\n"
        )

    def report(status: dict[str, Any]) -> None:
        if fmt is Format.json:
            return  # scripts get the one ready line; they ask the API for the rest
        sales = ", ".join(
            f"{s['currency']} net {s['net_amount']:,} ({s['count']:,} payments)"
            for s in status["sales_30d"]
        )
        typer.echo(
            f"{status['transactions']:,} transactions from {status['merchants']} merchants;"
            f" 30-day sales via {status['sales_source']}: {sales or 'none yet'}"
        )

    if fmt is Format.table:
        typer.echo(
            f"data in {c.settings.data_dir}, broker {broker.value}"
            f" ({c.settings.kafka_bootstrap if broker is DemoBroker.tansu else 'tally engines'});"
            " starting (Ctrl-C stops everything) ..."
        )
    # The demo runs both shipped datasources (payments and the merchants' API access
    # logs) unless the settings name their own; its child processes get the same.
    settings = c.settings
    if not settings.specs:
        settings = settings.model_copy(update={"specs": DEMO_SPECS})
    run_demo(
        settings,
        SpecRegistry.load(spec_paths(settings.specs)),
        broker=broker.value,
        rate=rate,
        duration=duration,
        seed=seed,
        report=report,
        ready=ready,
        port=port,
    )
    if fmt is Format.table:
        typer.echo("demo stopped")


DEMO_SPECS = (Path("payments"), Path("settlements"), Path("access_logs"))


def _register_subcommands() -> None:
    from compaction.cli import compaction_app
    from compaction.verify_cli import verify_command
    from engines.broker_cli import broker_app
    from engines.cli import app as engines_app
    from ingest.cli import register as register_ingest
    from producers.cli import register as register_producers
    from query_api.cli import register as register_api
    from rollups.cli import rollups_app
    from storage.druid.cli import druid_app
    from storage.starrocks.cli import starrocks_app

    app.add_typer(broker_app, name="broker")
    app.add_typer(rollups_app, name="rollups")
    app.add_typer(compaction_app, name="compaction")
    app.add_typer(engines_app, name="engines")
    app.add_typer(druid_app, name="druid")
    app.add_typer(starrocks_app, name="starrocks")
    app.command("verify")(verify_command)
    register_ingest(app)
    register_producers(app)
    register_api(app)


_register_subcommands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: translate every expected failure into one line and an exit code."""
    try:
        app(args=argv, prog_name="tally", standalone_mode=False)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    except TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message() + "\n")
            sys.exit(0)
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(exc.exit_code or 2)
    except TallyError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def run(argv: list[str]) -> Any:
    """Programmatic entry for tests: ``run(["sql", "SELECT 1"])``."""
    return main(argv)

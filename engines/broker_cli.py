"""``tally broker up|down|status``: the development broker (tansu, in memory)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from tally.clikit import FormatOption, state
from tally.output import Format, emit_record

if TYPE_CHECKING:
    from engines.devbroker import BrokerStatus

broker_app = typer.Typer(
    help="A local Kafka-protocol broker for development (tansu, in memory).", no_args_is_help=True
)


def _status_out(broker: BrokerStatus, fmt: Format) -> None:
    if broker.stale is not None:
        sys.stderr.write(f"warning: {broker.stale}\n")
    emit_record(broker.as_dict(), fmt)


@broker_app.command("up")
def broker_up(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Start the broker on TALLY_KAFKA_BOOTSTRAP (keeps nothing across restarts)."""
    from engines.devbroker import DevBroker

    _status_out(DevBroker(state(ctx).settings).up(), fmt)


@broker_app.command("down")
def broker_down(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Stop the broker; every topic and message is gone."""
    from engines.devbroker import DevBroker

    _status_out(DevBroker(state(ctx).settings).down(), fmt)


@broker_app.command("status")
def broker_status(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Bootstrap address, pid, and whether the broker is reachable."""
    from engines.devbroker import DevBroker

    _status_out(DevBroker(state(ctx).settings).status(), fmt)

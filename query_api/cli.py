"""``tally serve`` and ``tally keys create|list|revoke``."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import UTC, datetime
from typing import Annotated

import typer

from tally.clikit import FormatOption, state
from tally.errors import InvalidArgument
from tally.output import Format, emit_json, emit_table

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


@keys_app.command("create")
def create(
    ctx: typer.Context,
    merchant: Annotated[str | None, typer.Option(help="the merchant this key reads")] = None,
    admin: Annotated[bool, typer.Option(help="an operator key instead")] = False,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    from query_api.keys import KeyStore

    if (merchant is None) == (not admin):
        raise typer.BadParameter("give exactly one of --merchant ID or --admin")
    with KeyStore(state(ctx).settings.keys_path) as store:
        info, key = store.create(merchant, admin=admin)
    if fmt is Format.json:
        emit_json({"merchant_id": info.merchant_id, "key": key, "id": info.id})
    else:
        typer.echo(key)
        typer.echo(
            f"key id {info.id} for {info.merchant_id or 'admin'}: shown once, store it now",
            err=True,
        )


@keys_app.command("list")
def list_keys(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Every key's id, merchant, scope and state (never the key itself)."""
    from query_api.keys import KeyStore

    with KeyStore(state(ctx).settings.keys_path) as store:
        keys = store.list()
    rows = [
        {
            "id": k.id,
            "merchant_id": k.merchant_id,
            "scope": k.scope,
            "created_at": _iso(k.created_at),
            "revoked_at": _iso(k.revoked_at),
        }
        for k in keys
    ]
    if fmt is Format.json:
        emit_json({"keys": rows})
    else:
        cols = ["id", "merchant_id", "scope", "created_at", "revoked_at"]
        emit_table(cols, [[r[c] for c in cols] for r in rows])


@keys_app.command("revoke")
def revoke(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="the id `keys list` shows")]
) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from query_api.keys import KeyStore

    with KeyStore(state(ctx).settings.keys_path) as store:
        info = store.revoke(key_id)
    typer.echo(f"revoked {info.id} ({info.merchant_id or 'admin'})")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")

    @app.command("serve")
    def serve(
        ctx: typer.Context,
        host: Annotated[str | None, typer.Option(help="default: api.host")] = None,
        port: Annotated[
            int | None, typer.Option(min=0, max=65535, help="default: api.port")
        ] = None,
        workers: Annotated[int | None, typer.Option(min=1, help="default: api.workers")] = None,
    ) -> None:
        """Serve the query API (OpenAPI at /docs) with uvicorn worker processes; it only
        reads the store, so it runs beside `tally ingest`."""
        import uvicorn

        from tally.settings import HANDOFF_ENV, handoff

        settings = state(ctx).settings
        # Worker processes are fresh interpreters: they get this process's settings.
        os.environ[HANDOFF_ENV] = handoff(settings)
        listener = _listen(host or settings.api.host, settings.api.port if port is None else port)
        # Request metrics of all workers meet in one directory (see query_api.metrics).
        with tempfile.TemporaryDirectory(prefix="tally-metrics-") as shared:
            # Set before prometheus_client is first imported (by the app, in the
            # workers, or here when serving with a single worker).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
            uvicorn.run(
                "query_api.app:app_from_env",
                factory=True,
                fd=listener.fileno(),
                workers=workers or settings.api.workers,
                log_level="warning",
            )


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, with TCP_NODELAY set so accepted connections inherit it.

    uvicorn's worker processes receive the listener by pickling, which loses the
    socket's protocol number; asyncio then skips setting TCP_NODELAY on each
    connection, and Nagle plus the client's delayed ACK add ~40 ms to every response.
    """
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock

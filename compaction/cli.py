"""``tally compaction status|run|watch``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Annotated

import typer

from tally.clikit import FormatOption, LogFormatOption, state
from tally.errors import InvalidArgument
from tally.logs import LogFormat, setup_logging
from tally.output import Format, emit_json, emit_table

compaction_app = typer.Typer(
    help="See and drive compaction of late-written and fragmented partitions.",
    no_args_is_help=True,
)

DatasourceOption = Annotated[
    str | None, typer.Option(help="a datasource or rollup; default: all of them")
]


_MAX_ROUNDS = 64


@compaction_app.command("status")
def status(
    ctx: typer.Context, datasource: DatasourceOption = None, fmt: FormatOption = Format.table
) -> None:
    """Per partition: live segments, rows, bytes, late rows since the last compaction,
    when it was last compacted, whether a compaction is due, and damaged files."""
    from compaction.status import partition_status

    c = state(ctx)
    rows = partition_status(c.settings, c.registry, datasource)
    if fmt is Format.json:
        emit_json({"partitions": rows})
        return
    cols = ["datasource", "partition", "segments", "rows", "bytes", "late_rows", "due", "damaged"]
    emit_table(cols, [[r[k] or "" if k == "damaged" else r[k] for k in cols] for r in rows])


@compaction_app.command("run")
def run(
    ctx: typer.Context,
    datasource: DatasourceOption = None,
    partition: Annotated[
        str | None, typer.Option(help="partition key, e.g. 2026-11-22; default: every due one")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Compact now: one partition to a single segment, or everything due. Safe while
    ingestion runs (segments committed meanwhile stay live)."""
    from compaction.watcher import Watcher
    from storage import open_store

    c = state(ctx)
    if partition is not None and datasource is None:
        raise typer.BadParameter("--partition needs --datasource", param_hint="--partition")
    store = open_store(c.settings, c.registry)
    try:
        if partition is not None:
            assert datasource is not None
            known = {p.partition for p in store.partition_stats(datasource)}
            if partition not in known:
                shown = ", ".join(sorted(known)[-5:]) or "none stored yet"
                raise InvalidArgument(
                    f"{datasource} has no stored partition {partition!r} (the latest: {shown})"
                )
            results = [store.compactor.compact(datasource, partition)]
        else:
            watcher = Watcher(c.settings, c.registry, store)
            results = []
            for _ in range(_MAX_ROUNDS):  # a merge can make the next tier due
                tasks = watcher.due(datasource)
                if not tasks:
                    break
                bar = typer.progressbar(tasks, label="compacting", file=sys.stderr)
                with bar if fmt is Format.table else nullcontext(tasks) as items:
                    for task in items:
                        done = watcher.run_task(task)
                        if done is not None:
                            results.append(done.result)
        store.compactor.collect_garbage()
    finally:
        store.close()
    done_rows = [
        {
            "datasource": r.datasource,
            "partition": r.partition,
            "replaced_segments": r.replaced_segments,
            "rows_in": r.rows_in,
            "rows_out": r.rows_out,
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
        }
        for r in results
        if r is not None
    ]
    if fmt is Format.json:
        emit_json({"compacted": done_rows})
        return
    cols = ["datasource", "partition", "replaced_segments", "rows_in", "rows_out"]
    emit_table(cols, [[r[k] for k in cols] for r in done_rows])


@compaction_app.command("watch")
def watch(
    ctx: typer.Context,
    interval: Annotated[
        float | None,
        typer.Option(min=0.05, help="poll interval in seconds (compaction.interval_s)"),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="serve Prometheus metrics here (127.0.0.1)"),
    ] = None,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """The daemon: poll partition statistics and compact late-written old partitions,
    then size-tiered merges of hot ones, then pack cold days into one file a month,
    until SIGTERM or Ctrl-C."""
    from compaction.policy import Done
    from compaction.watcher import Watcher
    from storage import open_store

    c = state(ctx)
    settings = c.settings
    if interval is not None:
        settings = settings.model_copy(
            update={"compaction": settings.compaction.model_copy(update={"interval_s": interval})}
        )
    setup_logging(log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = metrics_port if metrics_port is not None else settings.compaction.metrics_port
    if port is not None:
        from compaction.metrics import serve

        try:
            serve(port)
        except OSError as exc:
            raise InvalidArgument(f"cannot serve metrics on port {port}: {exc.strerror}") from exc
    store = open_store(settings, c.registry)

    def note(done: Sequence[Done]) -> None:
        for d in done:
            lag = d.detect_to_done_s
            if lag is not None and d.task.kind == "late":
                logging.getLogger("compaction").info(
                    "%s/%s compacted %.1f s after its last write",
                    d.task.datasource,
                    d.task.partition,
                    lag,
                )

    try:
        report = Watcher(settings, c.registry, store).run(stop, note)
    finally:
        store.close()
    typer.echo(
        f"watcher stopped: {report.compactions} compactions, "
        f"{report.bytes_rewritten} bytes rewritten, {report.files_removed} files removed"
    )

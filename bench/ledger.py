"""Ledger benchmark: /v1/ledger over HTTP on payments with their settlements.

A store of generated payments (1M at --scale full; 10% canceled, some late) and their
settlements (``producers.settlements``: about two events per payment, holds,
reversals, payouts again) is built through the store API and compacted as the
watcher would; `tally serve` (two workers) answers /v1/ledger for a mid-volume
merchant, 90 days by day: from the two daily rollups (the route's default) and forced
to the base rows (admin tooling), p50/p99 at 1 and 8 clients. ``ledger_rollup_speedup``
is the base p99 over the rollup p99 at 1 client, measured in the same run. Then the
priority figures (``bench/priority.py``): payments' freshness beside a surge of 200k
access logs, with priority and without, in the same run.

    .venv/bin/python bench/ledger.py --scale small|full [--data-dir DIR] [--part P]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.api import (
    DAYS,
    START,
    compact_as_the_watcher_would,
    free_port,
    measure,
    mid_volume_merchant,
    serve,
)
from bench.common import Figures, Log, build_once, format_table, parser, percentile, write_results
from bench.priority import measure_priority
from producers.generate import GeneratorConfig, approval_tables, cancellations_for
from producers.settlements import generate_settlements
from query_api.keys import KeyStore
from query_api.ready import wait_ready
from storage import open_reader, open_store
from tally.settings import Settings
from tally.specs import SpecRegistry, spec_paths
from tally.timeutil import parse_time

SCALES = {
    "small": {"transactions": 100_000, "requests": 60, "steady_s": 20},
    "full": {"transactions": 1_000_000, "requests": 200, "steady_s": 40},
}
SPECS = (Path("payments"), Path("settlements"))


def build(settings: Settings, registry: SpecRegistry, n: int, log: Log) -> int:
    """n payments (and cancellations of 10% of them) and their settlements; returns
    the settlement events committed."""
    spec = registry.get("payments")
    sspec = registry.get("settlements")
    store = open_store(settings, registry)
    config = GeneratorConfig(transactions=n, merchants=500, days=DAYS, start=START, seed=5)
    rng = np.random.default_rng(5)
    done = settled = 0
    for table in approval_tables(config, 20_000):
        now = pc.max(table.column(spec.datasource.time)).as_py()
        picked = table.take(pa.array(np.flatnonzero(rng.random(table.num_rows) < 0.1)))
        cancels = cancellations_for(picked, now, seed=done).select(table.schema.names)
        both = pa.concat_tables([table, cancels])
        store.commit("payments", both, now=now)
        events = generate_settlements(both.to_pylist())
        rows = [{**e, **{t: parse_time(e[t]) for t in sspec.timestamps}} for e in events]
        for i in range(0, len(rows), 20_000):
            store.commit("settlements", rows[i : i + 20_000])
        done += table.num_rows
        settled += len(rows)
        if done % 200_000 == 0:
            log(f"built {done:,} payments, {settled:,} settlement events")
    compact_as_the_watcher_would(settings, registry, store, log)
    store.close()
    return settled


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--data-dir", type=Path, help="build the store here once, then reuse it")
    cli.add_argument("--part", choices=("ledger", "priority", "all"), default="all")
    args = cli.parse_args(argv)
    scale = SCALES[args.scale]
    log = Log()
    figures = Figures()
    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="tally-bench-ledger-"))
        )
        if args.part in ("ledger", "all"):
            ledger(data_dir, scale, figures, log)
        if args.part in ("priority", "all"):
            with tempfile.TemporaryDirectory(prefix="tally-bench-priority-") as work:
                measure_priority(Path(work), scale["steady_s"], figures, log)
    print(format_table(figures, "ledger"))
    write_results("ledger", figures, args.scale)
    return 0


def ledger(data_dir: Path, scale: dict[str, int], figures: Figures, log: Log) -> None:
    registry = SpecRegistry.load(spec_paths(SPECS))
    settings = Settings(data_dir=data_dir, specs=SPECS)
    n = scale["transactions"]
    build_once(data_dir, "ledger", n, lambda: build(settings, registry, n, log), log)
    figures.add("ledger_stored_payments", scale["transactions"], "rows")
    reader = open_reader(settings, registry)
    merchant = mid_volume_merchant(reader)
    events = reader.query("SELECT count(*) FROM settlements").rows[0][0]
    reader.close()
    figures.add("ledger_stored_settlements", events, "rows")
    keys = KeyStore(settings.keys_path)
    _, key = keys.create(merchant)
    _, admin_key = keys.create(None, admin=True)
    keys.close()
    port = free_port()
    server = serve(settings, port, {"TALLY_SPECS": '["payments", "settlements"]'})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout_s=120)
        end = START + timedelta(days=DAYS)
        span = {"from": (end - timedelta(days=90)).isoformat(), "to": end.isoformat()}
        base = {**span, "force_base": "true", "merchant": merchant}
        p99: dict[str, float] = {}
        for clients in (1, 8):
            for name, who, params in (
                ("ledger", key, span),
                ("ledger_base", admin_key, base),
            ):

                def ask(c: Any, _r: Any, params: dict[str, str] = params) -> Any:
                    return c.get("/v1/ledger", params=params)

                times = measure(url, who, ask, clients, scale["requests"])
                figures.add(f"{name}_p50_ms_c{clients}", percentile(times, 50), "ms")
                p99[f"{name}_c{clients}"] = figures.add(
                    f"{name}_p99_ms_c{clients}", percentile(times, 99), "ms"
                )
                log(f"{name} c{clients}: p99 {p99[f'{name}_c{clients}']:.1f} ms")
        figures.add("ledger_rollup_speedup", p99["ledger_base_c1"] / p99["ledger_c1"], "ratio")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())

"""Measure merge on read on a running Druid (not a test; the figures are in the
reader's docstring): generated events loaded with native batch tasks (versions and
duplicates spread over segments), then the same status count four ways.

    TALLY_TEST_DRUID_DIR=<a druid data dir> .venv/bin/python -m tests.storage.druid.measure_merge \
        [transactions]

1. raw: COUNT(*) GROUP BY status over every stored row (no merge: wrong, the floor);
2. window: the reader's merged relation (ROW_NUMBER), the whole datasource;
3. window, one Seoul day (the range a dashboard page reads);
4. LATEST_BY(status, MILLIS_TO_TIMESTAMP(version)) per key (ties on version are
   arbitrary), then counted.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlglot import exp

from producers.generate import GeneratorConfig
from storage.druid.reader import DruidReader
from storage.sql import col, subquery
from tally.errors import QueryError
from tally.settings import Settings
from tally.specs import SpecRegistry, builtin_spec_paths
from tests.druid import Druid
from tests.factories import latest_by_key
from tests.ingest.reference import build
from tests.storage.druid.conftest import druid_settings
from tests.storage.druid.loading import load


def timed(reader: DruidReader, sql: str, runs: int = 5) -> tuple[float, list[list[object]]]:
    times, rows = [], []
    for _ in range(runs):
        started = time.perf_counter()
        rows = reader.query(sql, timeout_s=120).rows
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, rows


def main() -> None:
    transactions = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    druid = Druid(Path(os.environ["TALLY_TEST_DRUID_DIR"]))
    registry = SpecRegistry.load(builtin_spec_paths())
    spec = registry.get("payments")
    base = Settings(data_dir=Path("/tmp"), topic_namespace=f"m{uuid.uuid4().hex[:8]}_")
    settings = druid_settings(druid, Path("/tmp"), base)
    published = build(
        GeneratorConfig(transactions=transactions, merchants=50, days=10, seed=5,
                        duplicate_rate=0.05, out_of_order_rate=0.1, cancel_rate=0.2),
        malformed_rate=0.0,
    )  # fmt: skip
    rows = published.good
    started = time.perf_counter()
    for i in range(4):
        name = load(druid, settings, spec, rows[i::4])
    load_s = time.perf_counter() - started
    reader = DruidReader(settings, registry)
    dialect = reader.capabilities.sql_dialect
    latest = latest_by_key(spec, rows)

    def by_status(relation: exp.Expression) -> str:
        query = exp.select(col("status"), exp.Count(this=exp.Star())).from_(subquery(relation, "m"))
        return query.group_by(exp.Literal.number(1)).sql(dialect=dialect)

    table = exp.Table(this=exp.to_identifier(name, quoted=True))
    first = min(r["approved_at"] for r in rows)
    day = first.astimezone(spec.tz).replace(hour=0, minute=0, second=0, microsecond=0)
    latest_by = (
        f'SELECT "status", COUNT(*) FROM (SELECT "merchant_id", "txn_id",'
        f' LATEST_BY("status", MILLIS_TO_TIMESTAMP("version")) AS "status" FROM "{name}"'
        " GROUP BY 1, 2) GROUP BY 1"
    )
    cases = {
        "raw (no merge)": by_status(exp.select(exp.Star()).from_(table)),
        "window, all": by_status(reader.relation("payments")),
        "window, one day": by_status(reader.relation("payments", day, day + timedelta(days=1))),
        "LATEST_BY per key": latest_by,
    }
    print(f"{len(rows):,} rows, {len(latest):,} keys, loaded in {load_s:.0f}s (4 tasks)")
    for label, sql in cases.items():
        try:
            ms, got = timed(reader, sql)
        except QueryError as exc:  # e.g. a nested GROUP BY short of merge buffers
            print(f"{label:20} refused: {exc.message[:120]}")
            continue
        print(f"{label:20} {ms:8.0f} ms  {sum(int(r[1]) for r in got):>8,} rows counted")  # type: ignore[call-overload]


if __name__ == "__main__":
    main()

"""``tally demo``: the platform end to end on the embedded default.

Starts the development broker (unless one already answers), creates the topics,
streams realistic payments — late cancellations into old partitions, duplicates,
out-of-order versions, malformed messages — runs both sinks, and reports what a
merchant dashboard would see, straight from the rollup router. Ctrl-C (or
``--duration``) stops everything cleanly. The HTTP API, the compaction watcher and
API keys join the demo as they land (see the README's status table).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.settings import Settings
from tally.specs import SpecRegistry


def _stream(
    settings: Settings, registry: SpecRegistry, rate: float, stop: threading.Event, seed: int
) -> None:
    from ingest.generate import GeneratorConfig, generate_events
    from ingest.malformed import with_malformed
    from ingest.publish import Publisher

    spec = registry.get("payments")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    config = GeneratorConfig(
        transactions=int(rate * 3600),
        merchants=50,
        days=30,
        start=today - timedelta(days=29),
        seed=seed,
    )
    wires = with_malformed(generate_events(config), 0.002, seed)

    def until_stopped() -> Any:
        for wire in wires:
            if stop.is_set():
                return
            yield wire

    Publisher(settings, settings.topic(spec.datasource.topic)).send(until_stopped(), rate=rate)


def summary(settings: Settings, registry: SpecRegistry) -> dict[str, Any]:
    from rollups.router import AggregateRequest, run
    from storage import open_reader

    spec = registry.get("payments")
    reader = open_reader(settings, registry)
    try:
        rows = reader.query("SELECT count(*), count(DISTINCT merchant_id) FROM payments").rows[0]
        local_today = datetime.now(spec.tz).replace(hour=0, minute=0, second=0, microsecond=0)
        req = AggregateRequest(
            start=local_today - timedelta(days=29),
            end=local_today + timedelta(days=1),
            granularity="month",
            group_by=("currency",),
        )
        routed, sales = run(reader, spec, req)
        fresh = reader.freshness(spec.name)
    finally:
        reader.close()
    return {
        "transactions": rows[0],
        "merchants": rows[1],
        "olap_freshness": fresh.isoformat() if fresh else None,
        "sales_30d": [
            dict(
                zip(
                    [
                        "bucket",
                        "currency",
                        "count",
                        "gross_amount",
                        "canceled_amount",
                        "net_amount",
                    ],
                    r,
                    strict=True,
                )
            )
            for r in sales.rows
        ],
        "sales_source": routed.source,
    }


def run_demo(
    settings: Settings,
    registry: SpecRegistry,
    *,
    rate: float,
    duration: float | None,
    seed: int,
    report: Any,
) -> dict[str, Any]:
    from ingest.broker import DevBroker, reachable
    from ingest.kafka import ensure_topics
    from ingest.service import run_ingest

    broker = DevBroker(settings)
    started_broker = not reachable(settings.kafka_bootstrap)
    if started_broker:
        broker.up()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        ensure_topics(settings, registry)
        threads = [
            threading.Thread(
                target=_stream,
                args=(settings, registry, rate, stop, seed),
                name="demo-publisher",
                daemon=True,
            ),
            threading.Thread(
                target=run_ingest,
                args=(settings, list(registry), ["olap", "search"], stop),
                name="demo-ingest",
                daemon=True,
            ),
        ]
        for t in threads:
            t.start()
        deadline = None if duration is None else time.monotonic() + duration
        last: dict[str, Any] = {}
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(min(5.0, max(0.1, (deadline or float("inf")) - time.monotonic())))
            last = summary(settings, registry)
            report(last)
        return last
    except KeyboardInterrupt:
        return {}
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if started_broker:
            broker.down()

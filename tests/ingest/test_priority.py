"""Priority between datasources in one ingest process, end to end: payments (critical)
flow at 1,000/s through the development broker while a surge of 200k access logs (low)
lands at once; one ``run_ingest`` serves both through both sinks.

What it proves, from every write the process's gate recorded: no access-log write
started while a payments batch was pending (queued or being written), and the writes a
payments batch found in progress were each at most ``ingest.yield_batch_rows`` rows —
the bound a surge can delay the payments by; the surge contended (the bound was needed)
and is fully ingested afterwards, and the payments are exact. How that bound reads in
milliseconds of freshness is measured, beside the same surge without priority, in
``bench/ledger.py`` (timings are not asserted here)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ingest.kafka import ensure_topics
from ingest.priority import RANKS, PriorityGate, Turn
from ingest.service import run_ingest
from producers.access_logs import AccessLogConfig, generate_access_logs
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, encode, with_malformed
from producers.publish import Publisher
from storage import open_reader
from tally.settings import IngestSettings, Settings
from tally.specs import SpecRegistry, spec_paths
from tests.brokers import Broker
from tests.conftest import broker_settings
from tests.ingest.reference import published
from tests.ingest.verify import assert_exact

NAMED = (Path("payments"), Path("access_logs"))
SURGE = 200_000
RATE = 1_000


def _stream(wires: Iterator[Wire], until: threading.Event, sent: list[Wire]) -> Iterator[Wire]:
    for wire in wires:
        if until.is_set():
            return
        sent.append(wire)
        yield wire


def _count(settings: Settings, registry: SpecRegistry, table: str) -> int:
    reader = open_reader(settings, registry)
    try:
        return int(reader.query(f"SELECT count(*) FROM {table}").rows[0][0])
    finally:
        reader.close()


def test_a_low_priority_surge_never_holds_back_the_payments(
    dev_broker: Broker, tmp_path: Path
) -> None:
    registry = SpecRegistry.load(spec_paths(NAMED))
    settings = broker_settings(dev_broker, tmp_path, partitions=3)
    # The shipped lingers (a deployment's), not the tests' shorter ones.
    ingest = IngestSettings(partitions=3, session_timeout_ms=3000)
    settings = settings.model_copy(update={"specs": NAMED, "ingest": ingest})
    assert registry.get("payments").datasource.priority == "critical"
    assert registry.get("access_logs").datasource.priority == "low"
    ensure_topics(settings, registry)
    cap = settings.ingest.yield_batch_rows
    gate = PriorityGate(cap, settings.ingest.yield_max_wait_s, record=True)
    stop = threading.Event()
    reports: list[object] = []
    ingesting = threading.Thread(
        target=lambda: reports.extend(
            run_ingest(settings, list(registry), ["olap", "search"], stop, gate=gate)
        )
    )
    # Generated as they are sent (more than the run needs): a prefix is published.
    payments = with_malformed(
        generate_events(GeneratorConfig(transactions=60_000, merchants=20, days=2, seed=21)),
        0.0,
        21,
    )
    logs = [
        Wire(e["request_id"].encode(), encode(e), None)
        for e in generate_access_logs(
            AccessLogConfig(SURGE, GeneratorConfig(transactions=10, merchants=20, seed=21), 21)
        )
    ]
    ingesting.start()
    enough, sent = threading.Event(), list[Wire]()
    flow = threading.Thread(
        target=lambda: Publisher(settings, settings.topic("payments.v1")).send(
            _stream(payments, enough, sent), rate=RATE
        )
    )
    try:
        flow.start()
        while not gate.turns:  # the payments flow before the surge lands
            stop.wait(0.05)
        surge_at = time.monotonic()
        Publisher(settings, settings.topic("access_logs.v1")).send(logs)
        while _count(settings, registry, "access_logs") < SURGE and ingesting.is_alive():
            stop.wait(0.5)
        surge_s = time.monotonic() - surge_at
        enough.set()
        flow.join(60)
        total = published(sent)
        while _count(settings, registry, "payments") < len({e["txn_id"] for e in total.good}):
            assert ingesting.is_alive(), reports
            stop.wait(0.2)
    finally:
        enough.set()
        stop.set()
        ingesting.join(60)
    assert not [r for r in reports if getattr(r, "error", None)], reports

    assert _count(settings, registry, "access_logs") == SURGE  # the surge, all of it
    assert_exact(settings, registry, total, search=False)
    assert gate.turns is not None
    critical = [t for t in gate.turns if t.rank == RANKS["critical"]]
    low = [t for t in gate.turns if t.rank == RANKS["low"]]

    def pending(c: Turn, at: float) -> bool:
        return c.queued <= at < c.ended

    # A low write may start beside a pending payments batch only once it waited its
    # longest (the payments were behind): it slows down, it does not starve.
    aged = [lo for lo in low if lo.started - lo.asked >= gate.max_wait_s]
    started_under = [
        (lo, c) for lo in low for c in critical if pending(c, lo.started) and lo not in aged
    ]
    assert not started_under, f"access logs written while payments waited: {started_under[:3]}"
    in_progress = [lo for lo in low if any(lo.started < c.queued < lo.ended for c in critical)]
    assert in_progress, "the surge never contended with the payments: nothing was proved"
    assert max(t.rows for t in in_progress) <= cap, [t.rows for t in in_progress]
    print(
        f"surge of {SURGE:,} ingested in {surge_s:.1f} s beside {len(total.wires):,} payments;"
        f" {len(critical)} payments writes, {len(in_progress)} found an access-log write"
        f" in progress (at most {max(t.rows for t in in_progress)} rows); {len(aged)} of"
        f" {len(low)} access-log writes waited their longest"
    )

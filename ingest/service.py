"""Run the sinks of one or more datasources, each in its own thread and consumer group.

Each sink has its own group, so a slow or rebuilding search index never holds back
the OLAP store. The lanes share one priority gate (``ingest.priority``): under backlog
the higher-priority datasources are written first. A sink that fails terminally
stops the others too: the process exits non-zero and a supervisor restarts it,
resuming exactly where the store is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ingest.priority import PriorityGate
from ingest.relay import KafkaRelay
from ingest.runner import Runner, RunReport
from ingest.sinks import OlapSink, SearchSink, Sink
from search import open_index
from storage import backend, open_store
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry


def make_sink(settings: Settings, spec: DatasourceSpec, name: str, registry: SpecRegistry) -> Sink:
    if name == "olap":
        if backend(settings.store.backend).capabilities.ingests_from_kafka:
            # The engine consumes a refined topic itself; Tally decodes and relays to it.
            return KafkaRelay(settings, spec)
        return OlapSink(settings, spec, open_store(settings, registry))
    return SearchSink(spec, open_index(settings, spec), settings.ingest.search_refresh_s)


def run_ingest(
    settings: Settings,
    specs: Sequence[DatasourceSpec],
    sinks: Sequence[str],
    stop: threading.Event,
    until_idle: float | None = None,
    metrics_port: int | None = None,
    gate: PriorityGate | None = None,
) -> list[RunReport]:
    registry = SpecRegistry(specs)
    if metrics_port is not None:
        from ingest.metrics import serve

        serve(metrics_port)
    gate = gate or (
        PriorityGate(settings.ingest.yield_batch_rows, settings.ingest.yield_max_wait_s)
        if settings.ingest.priority
        else None
    )
    runners = [
        Runner(settings, spec, make_sink(settings, spec, name, registry), stop, gate)
        for spec in specs
        for name in sinks
    ]
    reports: list[RunReport | None] = [None] * len(runners)

    def work(i: int) -> None:
        try:
            reports[i] = runners[i].run(until_idle)
        finally:
            if reports[i] is None or reports[i].error:  # type: ignore[union-attr]
                stop.set()

    threads = [
        threading.Thread(target=work, args=(i,), name=f"sink-{i}") for i in range(len(runners))
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return [r if r is not None else runners[i].report for i, r in enumerate(reports)]

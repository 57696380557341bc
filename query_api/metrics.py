"""Prometheus metrics of the API: requests and latency per route (summed over every
worker process of ``tally serve``), plus ingest figures read from the catalog at
scrape time.

uvicorn's workers are separate processes and a scrape reaches one of them, so
request metrics use prometheus_client's multiprocess mode when ``tally serve`` gives
the workers a shared ``PROMETHEUS_MULTIPROC_DIR``: each process writes its own
files and a scrape sums them. Catalog figures need no such care: any process reads
the same catalog.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fastapi import Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from query_api.services import Services

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry()
requests = Counter(
    "tally_api_requests_total", "HTTP requests", ["route", "method", "status"], registry=REGISTRY
)
latency = Histogram(
    "tally_api_request_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)


async def middleware(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    name = getattr(route, "path", "unmatched")
    latency.labels(name, request.method).observe(time.perf_counter() - started)
    requests.labels(name, request.method, str(response.status_code)).inc()
    return response


class CatalogCollector(Collector):
    """Ingest figures of the served datasource, read when scraped."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        services = self.services
        name = services.spec.name
        figures = services.reader.ingest_figures(name)
        now = datetime.now(UTC)
        fresh = GaugeMetricFamily(
            "tally_store_freshness_seconds",
            "now minus the newest committed event time, per datasource",
            labels=["datasource"],
        )
        if figures.newest_event_at is not None:
            fresh.add_metric([name], (now - figures.newest_event_at).total_seconds())
        yield fresh
        search = GaugeMetricFamily(
            "tally_search_freshness_seconds",
            "now minus the newest event time the search index has committed",
            labels=["datasource"],
        )
        newest = services.search.freshness()
        if newest is not None:
            search.add_metric([name], (now - newest).total_seconds())
        yield search
        offsets = GaugeMetricFamily(
            "tally_ingest_committed_offset",
            "next offset to consume, committed with the data it covers",
            labels=["datasource", "topic", "partition"],
        )
        for (topic, partition), offset in sorted(figures.offsets.items()):
            offsets.add_metric([name, topic, str(partition)], offset)
        yield offsets
        families = {
            field: GaugeMetricFamily(f"tally_store_{field}", text, labels=["datasource"])
            for field, text in (
                ("segments", "live segments"),
                ("rows", "stored rows (versions and tombstones until compacted)"),
                ("bytes", "bytes of live segments"),
                ("late_rows", "rows written into old partitions since their last compaction"),
            )
        }
        for datasource, values in sorted(figures.datasets.items()):
            for family, value in zip(families.values(), values, strict=True):
                family.add_metric([datasource], value)
        yield from families.values()
        letters = GaugeMetricFamily(
            "tally_ingest_dead_letters",
            "messages a sink could not use, and those not yet on the dead-letter topic",
            labels=["datasource", "sink", "state"],
        )
        for sink, (recorded, pending) in sorted(figures.dead_letters.items()):
            letters.add_metric([name, sink, "recorded"], recorded)
            letters.add_metric([name, sink, "unpublished"], pending)
        yield letters
        damaged = GaugeMetricFamily(
            "tally_store_damaged_partitions",
            "1 for each partition whose stored files are missing, truncated or altered",
            labels=["datasource", "partition"],
        )
        for datasource, parts in sorted(services.reader.damaged().items()):
            for part in sorted(parts):
                damaged.add_metric([datasource, part], 1)
        yield damaged


def render(services: Services) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (requests, latency):
            registry.register(collector)
    registry.register(CatalogCollector(services))
    return generate_latest(registry)

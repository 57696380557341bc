"""Prometheus metrics of the API process: requests and latency per route, plus the
store's ingest figures read from the catalog (freshness per datasource)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fastapi import Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from query_api.services import Services

CONTENT_TYPE = CONTENT_TYPE_LATEST
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
freshness = Gauge(
    "tally_store_freshness_seconds",
    "now minus the newest committed event time, per datasource (from the catalog)",
    ["datasource"],
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


def render(services: Services) -> bytes:
    newest = services.reader.freshness(services.spec.name)
    if newest is not None:
        age = (datetime.now(UTC) - newest).total_seconds()
        freshness.labels(services.spec.name).set(age)
    return generate_latest(REGISTRY)

"""``/healthz`` (the process answers), ``/readyz`` (store and search reachable; degraded,
still 200, when partitions are damaged: the rest is served),
``/metrics`` (Prometheus: requests and latency per route, ingest figures)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from query_api import metrics
from query_api.deps import ServicesDep
from query_api.errors import public
from query_api.models import Health
from tally.errors import TallyError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(services: ServicesDep) -> Response:
    checks: dict[str, str] = {}
    damaged: list[str] = []
    try:
        services.reader.refresh()
        damaged = [f"{n}/{p}" for n, parts in services.reader.damaged().items() for p in parts]
        checks["store"] = f"degraded: {len(damaged)} damaged partition(s)" if damaged else "ok"
    except TallyError as exc:
        checks["store"] = public(exc.message)
    try:
        services.search.freshness()
        checks["search"] = "ok"
    except TallyError as exc:
        checks["search"] = public(exc.message)
    # Degraded still serves: every query that does not read a damaged partition works.
    ready = all(v == "ok" for v in checks.values()) or (damaged and checks.get("search") == "ok")
    status = "not ready" if not ready else "degraded" if damaged else "ready"
    body = Health(status=status, checks=checks, damaged=sorted(damaged))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
def prometheus(services: ServicesDep) -> Response:
    return Response(metrics.render(services), media_type=metrics.CONTENT_TYPE)

"""``/healthz`` (the process answers), ``/readyz`` (store and search reachable),
``/metrics`` (Prometheus: requests and latency per route, ingest figures)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from query_api import metrics
from query_api.deps import ServicesDep
from query_api.models import Health
from tally.errors import TallyError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(services: ServicesDep) -> Response:
    checks: dict[str, str] = {}
    try:
        services.reader.refresh()
        checks["store"] = "ok"
    except TallyError as exc:
        checks["store"] = exc.message
    try:
        services.search.freshness()
        checks["search"] = "ok"
    except TallyError as exc:
        checks["search"] = exc.message
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
def prometheus(services: ServicesDep) -> Response:
    return Response(metrics.render(services), media_type=metrics.CONTENT_TYPE)

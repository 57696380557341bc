"""``GET /v1/admin/backends``: the event log, store and index in use, and whether each
answers now (admin keys). Always 200: a backend that is down is reported, not raised."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from fastapi import APIRouter

from ingest.kafka import partition_count
from query_api.deps import AdminDep, ServicesDep
from query_api.models import ADMIN_ERRORS, Backend, Backends
from tally.errors import BrokerError, TallyError

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/backends", response_model=Backends, responses=ADMIN_ERRORS)
def backends(services: ServicesDep, _: AdminDep) -> Backends:
    settings, spec = services.settings, services.spec
    topic = settings.topic(spec.datasource.topic)

    def check(call: Callable[[], object]) -> str:
        try:
            call()
        except TallyError as exc:
            return exc.message
        return "ok"

    def topic_exists() -> None:
        if partition_count(settings, topic) is None:
            raise BrokerError(f"topic {topic} does not exist (run: tally topics create)")

    caps = services.reader.capabilities
    return Backends(
        backends=[
            Backend(
                role="event log",
                backend="kafka",
                status=check(topic_exists),
                detail={"bootstrap": settings.kafka_bootstrap, "topic": topic},
            ),
            Backend(
                role="OLAP store",
                backend=caps.name,
                status=check(services.reader.refresh),
                detail=asdict(caps),
            ),
            Backend(
                role="search index",
                backend=settings.search.backend,
                status=check(services.search.freshness),
            ),
        ]
    )
